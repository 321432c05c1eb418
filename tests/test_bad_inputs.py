"""The README's promise, input by input: every bad input of issue 27 (and the earlier ones, in
test_glue_errors.py, test_pretrain_reliability.py, test_study.py, test_slurm.py) ends with exit status 2, one
`error:` line naming the flag or file, no traceback, and nothing written.

Most cases call the script's `main(argv)` in-process (the checks run before anything heavy is loaded); a few
run as subprocesses, as a user runs them, and the Slurm scripts run with DRY_RUN=1.
"""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import convert_bert_checkpoint
import modeling_electra
import run_glue
import run_study
import wikitext_trainer
from conftest import REPO_ROOT
from modeling_electra_config import ElectraMoEConfig
from pretrain_utils import trainer_argv
from test_pretrain_reliability import read_only

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, embedding_size=32,
            max_position_embeddings=64)  # fmt: skip


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def check_error(returncode: int | None, stderr: str, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line (argparse's usage lines may precede it), no traceback."""
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, stderr[-2000:]
    line = errors[0]
    assert line.startswith("error: ") or line.split(": error: ")[0].endswith((".py", ".sh")), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def call_main(main, argv: list[str]) -> tuple[int | None, str]:
    """`main(argv)` in-process: (exit status, stderr)."""
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue()


# ----------------------------------------------------------------------------------------------------------
# wikitext_trainer.py
# ----------------------------------------------------------------------------------------------------------

TRAINER_CASES = {
    "negative learning rate": (["--learning_rate", "-1"], ["--learning_rate -1"]),
    "3-token blocks": (["--max_seq_length", "3"], ["--max_seq_length 3"]),
    "fp16 on the CPU": (["--mixed_precision", "fp16", "--cpu"], ["--mixed_precision fp16"]),
    "top_k with expert choice": (
        ["--num_experts", "4", "--router_type", "expert_choice", "--top_k", "3"],
        ["--top_k 3", "expert_choice"],
    ),
    "expert_choice_scope with token choice": (
        ["--num_experts", "4", "--expert_choice_scope", "batch"],
        ["--expert_choice_scope batch", "softmax_topk"],
    ),
    "MoE layers on the dense model": (["--num_experts", "1", "--moe_layers", "0", "1"], ["--moe_layers"]),
    "top_k above num_experts": (["--num_experts", "4", "--top_k", "5"], ["top_k"]),
    "capacity factor 0": (["--num_experts", "4", "--capacity_factor", "0"], ["capacity_factor"]),
    "train_file a folder": (["--train_file", "{tmp}"], ["--train_file", "is a folder"]),
    "missing tokenizer folder": (["--tokenizer_name", "./no/such/vocab"], ["--tokenizer_name"]),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_refuses(case, tmp_path, vocab_dir):
    extra, fragments = TRAINER_CASES[case]
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    root = tmp_path / "runs"
    status, stderr = call_main(wikitext_trainer.main, trainer_argv(root, vocab_dir, *extra))
    check_error(status, stderr, *fragments)
    assert snapshot(root) == set()


def test_trainer_refuses_as_a_user_runs_it(tmp_path, vocab_dir):
    result = subprocess.run(
        [sys.executable, "wikitext_trainer.py", *trainer_argv(tmp_path, vocab_dir, "--learning_rate", "-1")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check_error(result.returncode, result.stderr, "--learning_rate -1")
    assert snapshot(tmp_path) == set()


# ----------------------------------------------------------------------------------------------------------
# convert_bert_checkpoint.py
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def electra_folder(tmp_path_factory) -> Path:
    """A saved ElectraMoE (not BERT) checkpoint: config.json and weights."""
    folder = tmp_path_factory.mktemp("electra")
    modeling_electra.ElectraMoEModel(ElectraMoEConfig(vocab_size=64, **TINY)).save_pretrained(folder)
    return folder


CONVERTER_CASES = {
    "a fake zip": (["--bert_path", "{fake_zip}"], ["--bert_path", "zip"]),
    "an ELECTRA folder": (
        ["--bert_path", "{electra}"],
        ["--bert_path", "electra_moe", "needs no conversion"],
    ),
    "top_k above num_experts": (["--num_experts", "4", "--top_k", "8"], ["top_k", "num_experts=4"]),
    "negative capacity factor": (["--num_experts", "4", "--capacity_factor", "-2"], ["capacity_factor"]),
    "zero experts": (["--num_experts", "0"], ["num_experts"]),
    "top_k with expert choice": (
        ["--num_experts", "4", "--router_type", "expert_choice", "--top_k", "3"],
        ["--top_k 3"],
    ),
    "missing checkpoint": (["--bert_path", "{tmp}/nonexistent"], ["--bert_path", "does not exist"]),
}


@pytest.mark.parametrize("case", list(CONVERTER_CASES))
def test_converter_refuses(case, tmp_path, electra_folder):
    (tmp_path / "fake.zip").write_text("not a zip")
    values = {
        "{fake_zip}": str(tmp_path / "fake.zip"),
        "{electra}": str(electra_folder),
        "{tmp}": str(tmp_path),
    }
    extra, fragments = CONVERTER_CASES[case]
    extra = [values.get(arg, arg.replace("{tmp}", str(tmp_path))) for arg in extra]
    argv = ["--bert_path", str(electra_folder), "--output_dir", str(tmp_path / "out"), *extra]
    status, stderr = call_main(convert_bert_checkpoint.main, argv)
    check_error(status, stderr, *fragments)
    assert not (tmp_path / "out").exists()


def test_converter_names_a_read_only_output_folder(tmp_path, electra_folder):
    with read_only(tmp_path / "readonly") as directory:
        argv = ["--bert_path", str(electra_folder), "--output_dir", str(directory / "out")]
        status, stderr = call_main(convert_bert_checkpoint.main, argv)
    check_error(status, stderr, "--output_dir", "not writable")
    assert not (directory / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# run_glue.py
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, vocab_dir) -> Path:
    """A tiny saved discriminator with its tokenizer (64 positions)."""
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    folder = tmp_path_factory.mktemp("glue_model") / "tiny"
    modeling_electra.ElectraMoEForPreTraining(ElectraMoEConfig(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


GLUE_CASES = {
    "zero epochs": (["--num_train_epochs", "0"], ["--num_train_epochs 0"]),
    "duplicate seeds": (["--seed", "9", "9"], ["--seed", "[9]"]),
    "sequences past the positions": (["--max_seq_length", "100000"], ["--max_seq_length 100000", "64"]),
    "negative learning rate": (["--learning_rate", "-1"], ["--learning_rate"]),
    "unknown task": (["--task_name", "rtee"], ["--task_name"]),
}
if not torch.cuda.is_available():
    GLUE_CASES["bf16 on the CPU"] = (["--bf16"], ["--bf16"])


@pytest.mark.parametrize("case", list(GLUE_CASES))
def test_run_glue_refuses(case, tmp_path, checkpoint):
    extra, fragments = GLUE_CASES[case]
    argv = ["--model_name_or_path", str(checkpoint), "--glue_dir", str(GLUE_FIXTURES), "--task_name", "rte",
            "--max_seq_length", "64", "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    status, stderr = call_main(run_glue.main, argv)
    check_error(status, stderr, *fragments)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# run_study.py: the whole config before any stage
# ----------------------------------------------------------------------------------------------------------


def demo_with(change) -> dict:
    study = json.loads((REPO_ROOT / "study_configs" / "demo.json").read_text())
    change(study)
    return study


def moe_model(study: dict) -> dict:
    return study["pretrain"]["models"]["moe-4x2"]


STUDY_CASES = {
    "top_k above num_experts": (lambda s: moe_model(s).update(top_k=8), ["moe-4x2", "top_k"]),
    "capacity factor 0": (lambda s: moe_model(s).update(capacity_factor=0), ["capacity_factor"]),
    "num_experts true": (lambda s: moe_model(s).update(num_experts=True), ["num_experts", "integer"]),
    "steps as a string": (
        lambda s: s["pretrain"]["common"].update(max_training_steps="300"),
        ["max_training_steps", "integer"],
    ),
    "duplicate seeds": (lambda s: s["glue"].update(seeds=[42, 42]), ["glue.seeds", "[42]"]),
    "model name with a slash": (lambda s: s["pretrain"]["models"].update({"a/b": {}}), ["'a/b'", "folder"]),
    "meaningless scope": (
        lambda s: moe_model(s).update(expert_choice_scope="batch"),
        ["--expert_choice_scope batch"],
    ),
}


@pytest.mark.parametrize("case", list(STUDY_CASES))
def test_run_study_refuses_before_any_stage(case, tmp_path):
    change, fragments = STUDY_CASES[case]
    config = tmp_path / "study.json"
    config.write_text(json.dumps(demo_with(change)))
    status, stderr = call_main(
        run_study.main, ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    )
    check_error(status, stderr, str(config), *fragments)
    assert not (tmp_path / "out").exists()


def test_run_study_refuses_as_a_user_runs_it(tmp_path):
    config = tmp_path / "study.json"
    config.write_text(json.dumps(demo_with(lambda s: s["glue"].update(seeds=[42, 42]))))
    result = subprocess.run(
        [sys.executable, "run_study.py", "--config", str(config), "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check_error(result.returncode, result.stderr, "glue.seeds")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Slurm scripts (DRY_RUN, no cluster needed)
# ----------------------------------------------------------------------------------------------------------

SLURM_CASES = {
    "pretrain index -1": (
        "Electra_MoE_Pretrainer.sh",
        {"SLURM_ARRAY_TASK_ID": "-1"},
        ["SLURM_ARRAY_TASK_ID"],
    ),
    "pretrain index abc": ("Electra_MoE_Pretrainer.sh", {"SLURM_ARRAY_TASK_ID": "abc"}, ["'abc'"]),
    "pretrain 4:8": ("Electra_MoE_Pretrainer.sh", {"CONFIGS": "4:8"}, ["'4:8'", "ACTIVE"]),
    "pretrain 0:0": ("Electra_MoE_Pretrainer.sh", {"CONFIGS": "0:0"}, ["'0:0'", "EXPERTS"]),
    "pretrain 8:1:expert_choice": ("Electra_MoE_Pretrainer.sh", {"CONFIGS": "8:1:expert_choice"}, ["top_k"]),
    "glue index -1": ("Run_GLUE_Evaluation.sh", {"SLURM_ARRAY_TASK_ID": "-1"}, ["SLURM_ARRAY_TASK_ID"]),
    "glue MODELS=/nonexist": ("Run_GLUE_Evaluation.sh", {"MODELS": "/nonexist"}, ["'/nonexist'"]),
    "glue TASKS=rtee": ("Run_GLUE_Evaluation.sh", {"TASKS": "rtee"}, ["'rtee'"]),
    "glue SEEDS=one": ("Run_GLUE_Evaluation.sh", {"SEEDS": "one"}, ["'one'"]),
    "glue SEEDS=1 1": ("Run_GLUE_Evaluation.sh", {"SEEDS": "1 01"}, ["SEEDS", "more than once"]),
}


@pytest.mark.parametrize("case", list(SLURM_CASES))
def test_slurm_scripts_refuse(case, tmp_path):
    script, variables, fragments = SLURM_CASES[case]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT),
           "DRY_RUN": "1", "MODELS": str(tmp_path), **variables}  # fmt: skip
    result = subprocess.run(["bash", str(REPO_ROOT / script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    check_error(result.returncode, result.stderr, *fragments)
    assert snapshot(tmp_path) == set()
