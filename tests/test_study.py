"""The whole pipeline end to end (pretrain -> GLUE -> gather -> notebook), at an even smaller size than
`make demo`, on the sample shipped in demo_data/."""

import json

import pytest

import run_study
from conftest import REPO_ROOT


def test_to_flags():
    flags = run_study.to_flags(
        {
            "num_experts": 4,
            "generator_moe": True,
            "push_to_hub": False,
            "task_name": ["rte", "wnli"],
            "x": None,
        }
    )
    assert flags == ["--num_experts", "4", "--generator_moe", "--task_name", "rte", "wnli"]


def test_bad_data_and_config_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="wikitext-2"):
        run_study.resolve_data(str(tmp_path))
    assert run_study.main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_local_layout_prefers_its_vocabulary(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "electra-vocab").mkdir()
    (tmp_path / "electra-vocab" / "vocab.txt").write_text("[PAD]\n")
    pretrain, tokenizer, glue, glue_dir = run_study.resolve_data(str(tmp_path))
    assert pretrain["train_file"].endswith("wiki.test.tokens") and pretrain["validation_file"].endswith(
        "wiki.valid.tokens"
    )
    assert tokenizer == {"tokenizer_name": str(tmp_path / "electra-vocab")}
    assert glue == {"glue_dir": str(tmp_path / "glue_data")} and glue_dir == tmp_path / "glue_data"


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_demo_sample(tmp_path):
    demo = json.loads((REPO_ROOT / "study_configs" / "demo.json").read_text())
    demo["pretrain"]["common"].update(
        max_training_steps=12,
        batch_size=8,
        max_seq_length=32,
        warmup_steps=2,
        logging_steps=4,
        eval_steps=6,
        save_steps=6,
    )
    demo["pretrain"]["tokenizer"] = {"train_tokenizer": 500}
    demo["glue"]["args"] = {
        "num_train_epochs": 1,
        "max_seq_length": 32,
        "max_train_samples": 64,
        "max_eval_samples": 64,
    }
    demo["glue"]["random_init_baselines"] = ["dense"]
    config = tmp_path / "tiny_demo.json"
    config.write_text(json.dumps(demo))
    out = tmp_path / "study"

    assert run_study.main(["--config", str(config), "--output_dir", str(out)]) == 0

    for name in ("dense", "moe-4x2"):
        assert (out / "pretrain" / name / "discriminator" / "config.json").is_file()
        for task in ("sst2", "stsb"):
            results = json.loads((out / "glue" / name / task / "seed_42" / "eval_results.json").read_text())
            assert results, f"{name}/{task} has no metrics"
    moe_config = json.loads((out / "pretrain" / "moe-4x2" / "discriminator" / "config.json").read_text())
    assert moe_config["num_experts"] == 4 and moe_config["top_k"] == 2
    summary = (out / "glue" / "glue_results_summary.csv").read_text()
    assert "moe-4x2" in summary and "dense_random_init" in summary
    figures = list((out / "figures").glob("*.png"))
    assert len(figures) >= 3, figures
    assert (out / "logs" / "pretrain_moe-4x2.log").stat().st_size > 0
    assert run_study.main(["--config", str(config), "--output_dir", str(out)]) == 2, (
        "a used output dir is refused"
    )
