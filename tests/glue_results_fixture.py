"""Synthetic results trees for gather_glue_results.py and the notebook, with hand-checkable scores.

Every metric of (model, task, seed) is `0.5 + MODEL_OFFSET + TASK_OFFSET + 0.01 * seed`, with the
two metrics of two-metric tasks (and MNLI m/mm) spread symmetrically around it, so a task score is
exactly that value and a model's GLUE score can be computed by hand.
"""

import json
from pathlib import Path

SEEDS = (1, 2)
TASK_OFFSET = {
    "cola": -0.3,
    "sst2": 0.35,
    "mrpc": 0.2,
    "stsb": 0.25,
    "qqp": 0.2,
    "mnli": 0.15,
    "qnli": 0.2,
    "rte": 0.03,
    "wnli": -0.1,
}
TINY_SHAPE = {"hidden_size": 128, "num_hidden_layers": 4}
# name -> (config.json contents, model offset, tasks run)
MODELS = {
    "dense": ({"model_type": "electra", **TINY_SHAPE}, 0.0, tuple(TASK_OFFSET)),
    "moe4_top1": (
        {
            "model_type": "electra_moe",
            "num_experts": 4,
            "top_k": 1,
            "capacity_factor": None,
            "model_size": "tiny",
        },
        0.02,
        tuple(TASK_OFFSET),
    ),
    "moe4_top2": (
        {
            "model_type": "electra_moe",
            "num_experts": 4,
            "top_k": 2,
            "capacity_factor": None,
            "model_size": "tiny",
        },
        0.03,
        tuple(TASK_OFFSET),
    ),
    "moe8_top2_cap1.25": (
        {"model_type": "electra_moe", "num_experts": 8, "top_k": 2, "capacity_factor": 1.25, **TINY_SHAPE},
        -0.01,
        tuple(TASK_OFFSET),
    ),
    "moe8_top1_partial": (
        {
            "model_type": "electra_moe",
            "num_experts": 8,
            "top_k": 1,
            "capacity_factor": None,
            "model_size": "tiny",
        },
        0.01,
        ("cola", "sst2", "rte", "wnli"),
    ),
}
SPREAD = 0.05


def metric_value(model: str, task: str, seed: int) -> float:
    return 0.5 + MODELS[model][1] + TASK_OFFSET[task] + 0.01 * seed


def eval_results(task: str, value: float) -> dict[str, float]:
    if task == "cola":
        metrics = {"eval_matthews_correlation": value}
    elif task in ("mrpc", "qqp"):
        metrics = {"eval_f1": value + SPREAD, "eval_accuracy": value - SPREAD}
        metrics["eval_combined_score"] = value
    elif task == "stsb":
        metrics = {
            "eval_pearson": value + SPREAD,
            "eval_spearmanr": value - SPREAD,
            "eval_combined_score": value,
        }
    elif task == "mnli":
        metrics = {"eval_accuracy": value + SPREAD, "eval_accuracy_mm": value - SPREAD, "eval_loss_mm": 0.9}
    else:
        metrics = {"eval_accuracy": value}
    return {"epoch": 3.0, "eval_loss": 0.7, "eval_samples": 100, **metrics}


def make_results_tree(root: Path) -> Path:
    """run_glue.py's layout for every model in MODELS, plus one original-study-layout configuration."""
    for model, (config, _, tasks) in MODELS.items():
        for task in tasks:
            for seed in SEEDS:
                run_dir = root / model / task / f"seed_{seed}"
                run_dir.mkdir(parents=True)
                (run_dir / "eval_results.json").write_text(
                    json.dumps(eval_results(task, metric_value(model, task, seed)))
                )
                (run_dir / "config.json").write_text(json.dumps(config))
    # The original study: <config>/<task>/eval_results.json, no seed folders.
    legacy = root / "original_study_4experts"
    legacy.mkdir()
    (legacy / "config.json").write_text(
        json.dumps({"model_type": "electra_moe", "num_experts": 4, "top_k": 2})
    )
    for task in ("rte", "sst2"):
        (legacy / task).mkdir()
        (legacy / task / "eval_results.json").write_text(json.dumps(eval_results(task, 0.6)))
    return root


def make_pretraining_run(directory: Path, num_moe_layers: int = 2, num_experts: int = 4) -> Path:
    """A pretraining metrics.jsonl: train and eval records, expert load per layer, some keys absent."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(0, 200, 20):
        skew = step / 400
        load = [
            [(1 + skew * (e - 1.5)) / num_experts for e in range(num_experts)] for _ in range(num_moe_layers)
        ]
        records.append(
            {
                "step": step,
                "split": "train",
                "loss": 10 - step / 40,
                "gen_loss": 6 - step / 80,
                "disc_loss": 0.6 - step / 1000,
                "disc_accuracy": 0.8 + step / 2000,
                "lr": 5e-4 * min(1.0, step / 100),
                "tokens_per_second": 1500.0,
                "expert_load": load,
            }
        )
        if step % 100 == 0:
            records.append(
                {"step": step, "split": "validation", "loss": 10.5 - step / 40, "disc_accuracy": 0.79}
            )
    records.append({"step": 200, "split": "train", "loss": 4.9})  # a record with most keys absent
    with open(directory / "metrics.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return directory


# Learning curves: two pretraining runs fine-tuned at steps 100, 200 and 300 (`<run>_step<N>`); the dense run
# with two seeds (an interval), the MoE run with one (an "n = 1" mark). The score rises with the step.
CURVE_RUNS = {"curve_dense": (SEEDS, 1e12), "curve_moe": (SEEDS[:1], 2e12)}
CURVE_STEPS = (100, 200, 300)
CURVE_TASKS = ("rte", "sst2")


def add_learning_curve_runs(root: Path) -> Path:
    """run_glue.py results of pretraining checkpoints: run_config.json with the pretraining run, step, FLOPs."""
    for run, (seeds, step_flops) in CURVE_RUNS.items():
        for step in CURVE_STEPS:
            for task in CURVE_TASKS:
                for seed in seeds:
                    run_dir = root / f"{run}_step{step}" / task / f"seed_{seed}"
                    run_dir.mkdir(parents=True)
                    value = 0.4 + step / 10_000 + TASK_OFFSET[task] + 0.01 * seed
                    (run_dir / "eval_results.json").write_text(json.dumps(eval_results(task, value)))
                    (run_dir / "config.json").write_text(json.dumps(MODELS["dense"][0]))
                    run_config = {
                        "checkpoint_record": {"pretraining_run": f"/runs/{run}"},
                        "pretraining_step": step,
                        "pretraining_flops": step * step_flops,
                    }
                    (run_dir / "run_config.json").write_text(json.dumps(run_config))
    return root
