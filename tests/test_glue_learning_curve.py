"""Learning curves: run_glue.py fine-tunes a pretraining run's intermediate checkpoints/checkpoint-N, and
the pretraining run records its provenance and keeps its W&B run id (offline) across a stop and resume."""

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import gather_glue_results
import glue_model
import run_glue
import run_state
import wikitext_trainer as wt
from input_checks import TOKENIZER_FILES
from pretrain_utils import trainer_argv
from provenance import PROVENANCE_FILE

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
STEPS = ["--max_training_steps", "4", "--save_steps", "2", "--save_total_limit", "2", "--eval_steps", "4"]


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory, vocab_dir) -> Path:
    """A 4-step pretraining run with checkpoints at steps 2 and 4, stopped by SIGUSR1 after step 2 and
    resumed, reporting to W&B offline when wandb is installed (else to TensorBoard)."""
    root = tmp_path_factory.mktemp("curve")
    report_to = "wandb" if _wandb_installed() else "tensorboard"
    argv = trainer_argv(root, vocab_dir, *STEPS, "--report_to", report_to)
    write_metrics = run_state.write_metrics

    def signal_after_step_2(run_dir, record):
        write_metrics(run_dir, record)
        if record["step"] == 2 and record["split"] == "train":
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setattr(run_state, "write_metrics", signal_after_step_2)
        assert wt.main(argv) == run_state.REQUEUE_EXIT_CODE
        patch.setattr(run_state, "write_metrics", write_metrics)
        assert wt.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    return root / "out" / "run"


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def test_pretraining_run_records_provenance_and_one_wandb_run(pretraining_run):
    provenance = json.loads((pretraining_run / PROVENANCE_FILE).read_text())
    assert {
        "git_commit",
        "git_dirty",
        "command",
        "python",
        "torch",
        "transformers",
        "datasets",
        "accelerate",
    } <= set(provenance)
    assert provenance["torch"] == torch.__version__
    assert "--resume_from_checkpoint" in provenance["command"]  # the latest start of the run
    assert (pretraining_run / "model_config" / "config.json").is_file()
    assert any((pretraining_run / "model_config" / name).is_file() for name in TOKENIZER_FILES)
    if not _wandb_installed():
        pytest.skip("wandb not installed")
    run_id = (pretraining_run / "wandb_run_id").read_text().strip()
    offline_runs = sorted(p.name for p in (pretraining_run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)


def test_checkpoint_n_holds_the_discriminator_of_step_n(pretraining_run, tmp_path):
    last = glue_model.resolve_glue_checkpoint(
        str(pretraining_run / "checkpoints" / "checkpoint-4"), None, False, tmp_path
    )
    assert (last.kind, last.pretraining_step, last.pretraining_run) == (
        "pretraining_checkpoint",
        4,
        str(pretraining_run),
    )
    assert last.tokenizer == str(pretraining_run / "discriminator")  # the finished run's own
    final = load_file(pretraining_run / "discriminator" / "model.safetensors")
    from_checkpoint = load_file(Path(last.path) / "model.safetensors")
    assert final.keys() == from_checkpoint.keys()
    assert all(torch.equal(final[name], from_checkpoint[name]) for name in final)
    middle = glue_model.resolve_glue_checkpoint(
        str(pretraining_run / "checkpoints" / "checkpoint-2"), None, False, tmp_path
    )
    weights = load_file(Path(middle.path) / "model.safetensors")
    assert any(not torch.equal(weights[name], final[name]) for name in final), "step 2 is not step 4"
    run = glue_model.resolve_glue_checkpoint(str(pretraining_run), None, False, tmp_path)
    assert (run.kind, run.pretraining_step) == ("pretraining_run", 4)


def test_run_glue_fine_tunes_an_intermediate_checkpoint(pretraining_run, tmp_path):
    checkpoint = pretraining_run / "checkpoints" / "checkpoint-2"
    code = run_glue.main(["--model_name_or_path", str(checkpoint), "--glue_dir", str(GLUE_FIXTURES),
                          "--task_name", "wnli", "--output_dir", str(tmp_path), "--num_train_epochs", "1",
                          "--max_train_samples", "4", "--seed", "1"])  # fmt: skip
    assert code == 0
    run_dir = tmp_path / "run_step2" / "wnli" / "seed_1"
    run_config = json.loads((run_dir / "run_config.json").read_text())
    assert run_config["pretraining_step"] == 2
    step_flops = glue_model.pretraining_step_flops(pretraining_run)
    assert step_flops > 0 and run_config["pretraining_flops"] == pytest.approx(2 * step_flops)
    assert run_config["checkpoint_record"]["pretraining_run"] == str(pretraining_run)
    assert "eval_accuracy" in json.loads((run_dir / "eval_results.json").read_text())
    # gather carries the pretraining run, step, FLOPs and the commit into its CSVs.
    assert gather_glue_results.main([str(tmp_path)]) == 0
    scores = pd.read_csv(tmp_path / gather_glue_results.SCORES_CSV)
    row = scores.iloc[0]
    assert (row["model"], row["pretrained_model"], row["pretraining_step"]) == ("run_step2", "run", 2)
    assert row["pretraining_flops"] == pytest.approx(run_config["pretraining_flops"])
    commit = json.loads((run_dir / PROVENANCE_FILE).read_text())["git_commit"]
    assert commit and row["git_commit"] == commit
    assert pd.read_csv(tmp_path / gather_glue_results.SUMMARY_CSV).iloc[0]["git_commit"] == commit


def test_a_checkpoint_without_a_model_config_is_refused(pretraining_run, tmp_path):
    orphan = tmp_path / "old_run" / "checkpoints" / "checkpoint-2"
    orphan.mkdir(parents=True)
    (orphan / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(run_glue.InputError, match="model_config/config.json"):
        glue_model.resolve_glue_checkpoint(str(orphan), None, False, tmp_path)


@pytest.mark.slow
def test_notebook_draws_glue_score_against_pretraining_step_and_flops(tmp_path):
    import run_study
    from glue_results_fixture import add_learning_curve_runs, make_results_tree

    results = add_learning_curve_runs(make_results_tree(tmp_path / "results"))
    assert gather_glue_results.main([str(results)]) == 0
    scores = pd.read_csv(results / gather_glue_results.SCORES_CSV)
    assert set(scores.dropna(subset=["pretraining_step"])["pretrained_model"]) == {"curve_dense", "curve_moe"}
    figures = tmp_path / "figures"
    notebook = run_study.execute_notebook(
        results / "glue_results_summary.csv", None, figures, tmp_path / "run.ipynb"
    )
    assert (figures / "glue_learning_curves.png").read_bytes().startswith(b"\x89PNG")
    shown = "".join(
        output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if "glue_learning_curves" in cell.source
        for output in cell.get("outputs", [])
    )
    rows = [line.split() for line in shown.splitlines()[1:]]
    # run, step, flops, mean, std, n, ...: the dense run has two seeds (an interval), the MoE run one.
    points = sorted((row[1], float(row[2]), int(row[6])) for row in rows)
    expected = [
        (run, step, n) for run, n in (("curve_dense", 2), ("curve_moe", 1)) for step in (100, 200, 300)
    ]
    assert points == sorted(expected)


def test_study_configs_name_the_checkpoints_to_fine_tune():
    import run_study
    import study_config

    glue = {"models": ["dense", "moe"], "random_init_baselines": ["dense"], "checkpoint_steps": [100, 200]}
    runs = study_config.glue_runs(glue, ["dense", "moe"])
    assert [(label, step) for label, _, _, step in runs if step] == [
        ("dense_step100", 100), ("dense_step200", 200), ("moe_step100", 100), ("moe_step200", 200),
    ]  # fmt: skip
    demo = json.loads((Path(run_study.__file__).parent / "study_configs" / "demo.json").read_text())
    study_config.validate_study(demo, check_flag_names=False)
    common = demo["pretrain"]["common"]
    kept = range(common["max_training_steps"], 0, -common["save_steps"])[: common["save_total_limit"]]
    assert set(demo["glue"]["checkpoint_steps"]) <= set(kept), "the demo keeps the checkpoints it fine-tunes"
    demo["glue"]["checkpoint_steps"] = [150]
    with pytest.raises(study_config.ConfigError, match="not multiples of pretrain.common.save_steps"):
        study_config.validate_study(demo, check_flag_names=False)
