"""The whole pipeline end to end (pretrain -> GLUE -> gather -> notebook), at an even smaller size than
`make demo`, on the sample shipped in demo_data/."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import run_study
import study_config
from conftest import REPO_ROOT

DEMO_DATA = REPO_ROOT / "demo_data"
DEMO_SAMPLE_MAX_BYTES = 600_000


def test_to_flags():
    flags = study_config.to_flags(
        {
            "num_experts": 4,
            "generator_moe": True,
            "push_to_hub": False,
            "task_name": ["rte", "wnli"],
            "x": None,
        }
    )
    assert flags == ["--num_experts", "4", "--generator_moe", "--task_name", "rte", "wnli"]


@pytest.mark.parametrize("script", ["wikitext_trainer.py", "run_glue.py", "convert_bert_checkpoint.py"])
def test_script_flags_are_every_long_option_of_the_scripts_parser(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow help: long invocations get their help on the next line
    parser = __import__(script[:-3]).build_argument_parser()
    expected = {o[2:] for action in parser._actions for o in action.option_strings if o.startswith("--")}
    assert study_config.script_flags(script) == expected
    assert {"help", "seed", "dataset_subname"} & expected <= study_config.script_flags(script)


def test_bad_data_and_config_are_refused(tmp_path, capsys):
    with pytest.raises(study_config.ConfigError, match="wikitext-2"):
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
def test_pipeline_end_to_end_on_the_demo_sample(tmp_path, capsys):
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
    demo["glue"].pop("checkpoint_steps")  # learning curves: tests/test_glue_learning_curve.py
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

    # --resume after a stop: finished pretraining and GLUE runs are kept, only the missing run is redone.
    kept = out / "glue" / "dense" / "sst2" / "seed_42" / "eval_results.json"
    kept_mtime = kept.stat().st_mtime_ns
    shutil.rmtree(out / "glue" / "moe-4x2" / "stsb" / "seed_42")
    assert run_study.main(["--config", str(config), "--output_dir", str(out), "--resume"]) == 0
    assert (out / "glue" / "moe-4x2" / "stsb" / "seed_42" / "eval_results.json").is_file()
    assert kept.stat().st_mtime_ns == kept_mtime
    printed = capsys.readouterr().out
    assert "stage pretrain_dense: finished before, skipped" in printed
    assert "stage glue_dense: finished before, skipped" in printed


def test_missing_glue_runs(tmp_path):
    done = tmp_path / "m" / "rte" / "seed_1"
    done.mkdir(parents=True)
    (done / "eval_results.json").write_text("{}")
    (tmp_path / "m" / "cola" / "seed_1").mkdir(parents=True)  # a run that never finished
    assert run_study.missing_glue_runs(tmp_path, "m", ["cola", "rte"], [1, 2]) == {"cola": [1, 2], "rte": [2]}
    assert run_study.missing_glue_runs(tmp_path, "m", ["rte"], [1]) == {}


def test_study_needs_a_model_source_and_an_existing_checkpoint(tmp_path, capsys):
    neither = tmp_path / "neither.json"
    neither.write_text(json.dumps({"glue": {"tasks": ["rte"], "seeds": [1]}}))
    assert run_study.main(["--config", str(neither), "--output_dir", str(tmp_path / "a")]) == 2
    assert 'needs a "pretrain" or a "convert" section' in capsys.readouterr().err
    convert = tmp_path / "convert.json"
    study = {"convert": {"bert_path": str(tmp_path / "nope.whl"), "models": {"d": {}}}, "glue": {"tasks": ["rte"], "seeds": [1]}}  # fmt: skip
    convert.write_text(json.dumps(study))
    assert run_study.main(["--config", str(convert), "--output_dir", str(tmp_path / "b")]) == 2
    assert "nope.whl not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def run_study_process(config, tmp_path, text: str | None = None) -> subprocess.CompletedProcess:
    """run_study.py as a user runs it, on a config written from `config` (or the raw `text`)."""
    path = tmp_path / "study.json"
    path.write_text(text if text is not None else json.dumps(config))
    command = [sys.executable, str(REPO_ROOT / "run_study.py"), "--config", str(path)]
    command += ["--output_dir", str(tmp_path / "out"), "--data", str(DEMO_DATA)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def demo_study() -> dict:
    return json.loads((REPO_ROOT / "study_configs" / "demo.json").read_text())


def without(study: dict, *path: str) -> dict:
    node = study
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return study


def renamed(study: dict, section: str, old: str, new: str, value=None) -> dict:
    study[section][new] = study[section].pop(old) if value is None else value
    return study


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (without(demo_study(), "glue"), "missing required key 'glue'"),
        (without(demo_study(), "pretrain", "models"), "missing required key 'pretrain.models'"),
        (renamed(demo_study(), "glue", "seeds", "seed"), "unknown key 'glue.seed' (did you mean 'glue.seeds'?)"),
        (renamed(demo_study(), "glue", "seeds", "seeds", "1, 2"), "'glue.seeds' must be a non-empty list of integers"),
        (renamed(demo_study(), "glue", "random_init_baselines", "random_init_baseline"),
         "unknown key 'glue.random_init_baseline' (did you mean 'glue.random_init_baselines'?)"),
        (renamed(demo_study(), "glue", "tasks", "tasks", ["sst2", "sts-b"]), "unknown task 'sts-b' (did you mean 'stsb'?)"),
        (renamed(demo_study(), "glue", "random_init_baselines", "random_init_baselines", ["moe"]),
         "'moe' is not one of the study's models"),
        (renamed(demo_study(), "glue", "baseline", "baseline", "moe"),
         "'glue.baseline': 'moe' is not one of the fine-tuned models"),
    ],
)  # fmt: skip
def test_bad_configs_exit_2_with_one_line_before_anything_is_created(config, message, tmp_path):
    proc = run_study_process(config, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(
        f"error: {tmp_path / 'study.json'}: "
    )
    assert message in proc.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in proc.stderr


def test_invalid_json_names_the_file(tmp_path):
    proc = run_study_process(None, tmp_path, text='{"glue": {"tasks": ["rte"],}}')
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert (
        proc.stderr.startswith(f"error: {tmp_path / 'study.json'} is not valid JSON: ")
        and "line 1" in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_flags_are_checked_against_the_scripts_they_go_to(tmp_path, capsys):
    for section, key, script, hint in (
        (("glue", "args"), "num_train_epoch", "run_glue.py", "num_train_epochs"),
        (("pretrain", "common"), "max_train_steps", "wikitext_trainer.py", "max_training_steps"),
        (("pretrain", "models", "dense"), "num_expert", "wikitext_trainer.py", "num_experts"),
    ):
        study = demo_study()
        node = study
        for part in section:
            node = node[part]
        node[key] = 1
        with pytest.raises(study_config.ConfigError) as error:
            study_config.validate_study(study)
        assert (
            str(error.value)
            == f"'{'.'.join(section)}.{key}' is not a flag of {script} (did you mean '{hint}'?)"
        )
    for name in ("demo", "mini_study", "transfer", "upcycle", "upcycle_select"):
        study_config.validate_study(json.loads((REPO_ROOT / "study_configs" / f"{name}.json").read_text()))


def test_demo_sample_pretraining_text_covers_the_glue_vocabulary():
    """The demo can only transfer if the words its GLUE tasks turn on are in the pretraining text."""
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    corpus = words((DEMO_DATA / "wikitext-2" / "wiki.train.tokens").read_text())
    for task, column in (("SST-2", "sentence"), ("STS-B", "sentence1")):
        with (DEMO_DATA / "glue_data" / task / "train.tsv").open() as f:
            text = " ".join(row[column] for row in csv.DictReader(f, delimiter="\t"))
        assert words(text) <= corpus, f"{task} words missing from the corpus: {sorted(words(text) - corpus)}"


@pytest.mark.slow
def test_transfer_study_converts_upcycles_and_fine_tunes(tmp_path, vocab_dir):
    """A "convert" study: a saved BERT becomes the dense model and its upcycled copy, both fine-tuned."""
    torch.manual_seed(0)
    bert = tmp_path / "bert"
    config = BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(vocab_dir)), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(bert)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(bert)
    study = json.loads((REPO_ROOT / "study_configs" / "transfer.json").read_text())
    study["convert"]["models"] = {
        "bert-dense": {"num_experts": 1},
        "bert-2x2": {"num_experts": 2, "top_k": 2},
    }
    study["glue"].update(tasks=["sst2"], seeds=[3])
    study["glue"]["args"].update(max_train_samples=32, max_eval_samples=32, max_seq_length=32)
    path = tmp_path / "transfer.json"
    path.write_text(json.dumps(study))
    out = tmp_path / "study"

    args = [
        "--config",
        str(path),
        "--bert_path",
        str(bert),
        "--data",
        str(DEMO_DATA),
        "--output_dir",
        str(out),
    ]
    assert run_study.main(args) == 0

    upcycled = json.loads((out / "converted" / "bert-2x2" / "config.json").read_text())
    assert upcycled["num_experts"] == 2 and upcycled["top_k"] == 2
    for name in ("bert-dense", "bert-2x2"):
        results = json.loads((out / "glue" / name / "sst2" / "seed_3" / "eval_results.json").read_text())
        assert "eval_accuracy" in results
    assert "bert-2x2" in (out / "glue" / "glue_results_summary.csv").read_text()
    assert list((out / "figures").glob("*.png"))


def test_demo_sample_is_what_its_script_writes(tmp_path):
    """demo_data/ is reproducible from make_demo_data.py and stays small enough to ship."""
    sys.path.insert(0, str(DEMO_DATA))
    try:
        import make_demo_data
    finally:
        sys.path.remove(str(DEMO_DATA))
    assert make_demo_data.main(["--output_dir", str(tmp_path)]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written and all((DEMO_DATA / p).read_bytes() == (tmp_path / p).read_bytes() for p in written)
    assert sum((tmp_path / p).stat().st_size for p in written) < DEMO_SAMPLE_MAX_BYTES


def test_upcycle_study_converts_continues_and_fine_tunes_every_arm_alike(tmp_path, monkeypatch):
    """The upcycling study's wiring (commands recorded, not run): three conversions, each continued-pretraining
    arm from its converted model with the same flags, one fine-tuning recipe for the four arms."""
    commands = {}
    monkeypatch.setattr(
        run_study, "run_stage", lambda name, command, log_dir: commands.setdefault(name, command)
    )
    reported = []
    monkeypatch.setattr(
        run_study,
        "report_stages",
        lambda *args: reported.append(args) or (tmp_path / "figures", tmp_path / "nb.ipynb"),
    )
    wheel = tmp_path / "minilm.whl"
    wheel.write_bytes(b"")
    data = tmp_path / "data"  # the ../shared/data layout (the stages are not run: folders suffice)
    shutil.copytree(DEMO_DATA / "wikitext-2", data / "wikitext-2")
    for task in ("CoLA", "RTE"):
        (data / "glue_data" / task).mkdir(parents=True)
    out = tmp_path / "study"
    argv = ["--config", str(REPO_ROOT / "study_configs" / "upcycle.json"), "--bert_path", str(wheel)]
    assert run_study.main([*argv, "--data", str(data), "--output_dir", str(out)]) == 0
    assert reported[0][-1] == "minilm-dense-cont"  # every arm is compared with the continued dense model

    def flags(name):
        command = commands[name]
        values = [*command[1:], "--"]
        return {arg[2:]: (values[i] if not values[i].startswith("--") else True)
                for i, arg in enumerate(command) if arg.startswith("--")}  # fmt: skip

    assert flags("convert_minilm-ec")["router_type"] == "expert_choice"
    assert flags("convert_minilm-8x2")["num_experts"] == "8" and flags("convert_minilm-8x2")["top_k"] == "2"
    continued = {arm: flags(f"pretrain_minilm-{arm}-cont") for arm in ("dense", "8x2", "ec")}
    for arm, options in continued.items():
        assert (
            options["init_discriminator_from"]
            == options["tokenizer_name"]
            == str(out / "converted" / f"minilm-{arm}")
        )
        assert options["model_save_name"] == f"minilm-{arm}-cont"
    assert continued["ec"].pop("capacity_factor") == "2.0"  # the trainer takes capacity from the flags
    shared = [{k: v for k, v in o.items() if k not in ("init_discriminator_from", "tokenizer_name", "model_save_name")}
              for o in continued.values()]  # fmt: skip
    assert shared[0] == shared[1] == shared[2] and shared[0]["seed"] and shared[0]["max_training_steps"]
    glue = {name: command for name, command in commands.items() if name.startswith("glue_")}
    models = {flags(name)["model_name"]: flags(name)["model_name_or_path"] for name in glue}
    assert models == {
        "minilm-dense": str(out / "converted" / "minilm-dense"),
        **{
            f"minilm-{arm}-cont": str(out / "pretrain" / f"minilm-{arm}-cont")
            for arm in ("dense", "8x2", "ec")
        },
    }
    for name, command in glue.items():  # one call per task (their max_seq_length differ), same seeds
        task = flags(name)["task_name"]
        assert command[command.index("--seed") + 1 : command.index("--seed") + 6] == ["1", "2", "3", "4", "5"]
        assert flags(name)["max_seq_length"] == {"cola": "64", "rte": "128"}[task]
        assert flags(name)["learning_rate"] == "0.0001" and flags(name)["layerwise_lr_decay"] == "1.0"
    assert sorted(flags(name)["task_name"] for name in glue) == ["cola"] * 4 + ["rte"] * 4
