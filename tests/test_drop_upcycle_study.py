"""The Drop-Upcycling study (#26): its wiring (commands recorded, not run) and its report on known metrics."""

import json
import shutil
from pathlib import Path

import pytest

import run_study
import study_config
from bench import fixed_eval_report

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "study_configs" / "drop_upcycle.json"
SEEDS = (1, 2, 3)


def flags(command):
    values = [*command[1:], "--"]
    return {arg[2:]: (values[i] if not values[i].startswith("--") else True)
            for i, arg in enumerate(command) if arg.startswith("--")}  # fmt: skip


def test_study_builds_the_fixed_set_first_and_pairs_every_arm_by_seed(tmp_path, monkeypatch):
    commands = {}
    monkeypatch.setattr(
        run_study, "run_stage", lambda name, command, log_dir: commands.setdefault(name, command)
    )
    monkeypatch.setattr(
        run_study, "report_stages", lambda *args: (tmp_path / "figures", tmp_path / "nb.ipynb")
    )
    wheel = tmp_path / "minilm.whl"
    wheel.write_bytes(b"")
    data = tmp_path / "data"  # the ../shared/data layout (the stages are not run: folders suffice)
    shutil.copytree(REPO_ROOT / "demo_data" / "wikitext-2", data / "wikitext-2")
    (data / "glue_data" / "CoLA").mkdir(parents=True)
    out = tmp_path / "study"
    argv = ["--config", str(CONFIG), "--bert_path", str(wheel), "--data", str(data), "--output_dir", str(out)]
    assert run_study.main(argv) == 0

    order = list(commands)
    pretrain = [name for name in order if name.startswith("pretrain_")]
    assert (
        pretrain[0] == "pretrain_reference-dense"
        and order.index("fixed_eval_set") == order.index(pretrain[0]) + 1
    )
    eval_set = flags(commands["fixed_eval_set"])
    assert eval_set["reference_run"] == str(out / "pretrain" / "reference-dense")
    assert eval_set["eval_set"] == str(out / "fixed_eval" / "rtd_eval.npz")
    assert "fixed_eval_set" not in flags(commands["pretrain_reference-dense"])
    for seed in SEEDS:
        copy, drop = (
            flags(commands[f"convert_minilm-8x2-copy-s{seed}"]),
            flags(commands[f"convert_minilm-8x2-drop-s{seed}"]),
        )
        assert copy["upcycle_seed"] == drop["upcycle_seed"] == str(seed)  # same routers, the drop draw varies
        assert (
            copy["upcycle_method"] == "copy"
            and drop["upcycle_method"] == "drop"
            and drop["drop_ratio"] == "0.5"
        )
        arms = {arm: flags(commands[f"pretrain_{arm}-cont-s{seed}"]) for arm in ("dense", "copy", "drop")}
        shared = [{k: v for k, v in o.items() if k not in ("init_discriminator_from", "tokenizer_name", "model_save_name")}
                  for o in arms.values()]  # fmt: skip
        assert shared[0] == shared[1] == shared[2] and shared[0]["seed"] == str(seed)
        assert shared[0]["fixed_eval_set"] == eval_set["eval_set"]
        steps = int(shared[0]["max_training_steps"])
        assert int(shared[0]["eval_steps"]) * 10 == steps  # N/10 intervals
        assert arms["drop"]["init_discriminator_from"] == str(out / "converted" / f"minilm-8x2-drop-s{seed}")
    assert len(pretrain) == 1 + 3 * len(SEEDS)


def test_a_fixed_eval_reference_must_be_a_pretrain_model():
    study = json.loads(CONFIG.read_text())
    study["fixed_eval"]["reference"] = "minilm-dense"
    with pytest.raises(study_config.ConfigError, match="fixed_eval.reference"):
        study_config.validate_study(study, check_flag_names=False)


def write_run(root, name, aucs, spread=None):
    run = root / "pretrain" / name
    run.mkdir(parents=True)
    lines = [json.dumps({"step": 1, "split": "train", "loss": 1.0})]
    for step, auc in aucs.items():
        record = {"step": step, "split": "validation", "fixed_generator_auc": auc}
        record |= {f"fixed_{m}": 0.5 for m in fixed_eval_report.METRICS if m != "generator_auc"}
        if spread is not None:
            record |= {
                "fixed_expert_spread": [spread, 3 * spread],
                "fixed_generator_router_entropy": [2.0, 2.0],
                "fixed_generator_expert_load": [[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0]],
            }
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_pairs_arms_by_seed(tmp_path, capsys):
    for seed, offset in zip(SEEDS, (0.0, 0.01, 0.02), strict=True):
        write_run(tmp_path, f"dense-cont-s{seed}", {10: 0.6 + offset, 20: 0.7 + offset})
        # drop = dense + 0.1 at the last step on every seed: a zero-width interval around 0.1
        write_run(tmp_path, f"drop-cont-s{seed}", {10: 0.6 + 2 * offset, 20: 0.8 + offset}, spread=0.1)
    write_run(tmp_path, "reference-dense", {20: 0.5})  # not an arm: no -cont-s<seed>
    assert fixed_eval_report.main(["--study_dir", str(tmp_path)]) == 0
    differences = fixed_eval_report.pd.read_csv(tmp_path / "fixed_eval" / "paired_differences.csv")
    last = differences[(differences["step"] == 20) & (differences["metric"] == "generator_auc")].iloc[0]
    assert last["arm"] == "drop" and last["diff"] == pytest.approx(0.1) and last["diff_n"] == 3
    assert last["diff_ci95_low"] == pytest.approx(0.1) and last["diff_ci95_high"] == pytest.approx(0.1)
    first = differences[(differences["step"] == 10) & (differences["metric"] == "generator_auc")].iloc[0]
    assert first["diff"] == pytest.approx(0.01) and first["diff_ci95_low"] < 0.01 < first["diff_ci95_high"]
    curves = fixed_eval_report.pd.read_csv(tmp_path / "fixed_eval" / "curves.csv")
    assert set(curves["arm"]) == {"dense", "drop"} and len(curves) == 12
    assert curves[curves["arm"] == "drop"]["expert_spread"].eq(0.2).all()  # the mean over MoE layers
    assert curves[curves["arm"] == "drop"]["load_imbalance"].eq(1.5).all()  # (1 + 2) / 2
    assert curves[curves["arm"] == "dense"]["load_imbalance"].isna().all()
    assert (tmp_path / "fixed_eval" / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert fixed_eval_report.main(["--study_dir", str(tmp_path), "--metrics", "generator_auc"]) == 0
    printed = capsys.readouterr().out
    assert "generator_auc" in printed and "uniform_auc" not in printed
    assert fixed_eval_report.main(["--study_dir", str(tmp_path), "--baseline", "nope"]) == 2
    assert "--baseline nope" in capsys.readouterr().err
    assert fixed_eval_report.main(["--study_dir", str(tmp_path), "--metrics", "auc"]) == 2
    assert "--metrics ['auc']" in capsys.readouterr().err
