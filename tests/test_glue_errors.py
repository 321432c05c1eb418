"""run_glue.py on bad input: one line naming the flag or path and what to do, exit 2, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import modeling_electra
import run_glue
from modeling_electra_config import ElectraMoEConfig, make_generator_config

REPO_ROOT = Path(__file__).resolve().parent.parent
GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, embedding_size=32,
            max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory, vocab_dir) -> Path:
    """A pretraining run folder as wikitext_trainer.py leaves it: discriminator/ and generator/."""
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(0)
    config = ElectraMoEConfig(vocab_size=tokenizer.vocab_size, **TINY)
    run_dir = tmp_path_factory.mktemp("pretrain") / "my_run"
    for name, model in (
        ("discriminator", modeling_electra.ElectraMoEForPreTraining(config)),
        ("generator", modeling_electra.ElectraMoEForMaskedLM(make_generator_config(config))),
    ):
        model.save_pretrained(run_dir / name)
        tokenizer.save_pretrained(run_dir / name)
    return run_dir


def run_glue_cli(*argv: str, output_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "run_glue.py", "--glue_dir", str(GLUE_FIXTURES), "--task_name", "rte",
               "--output_dir", str(output_dir), *argv]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def check_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_glue.py: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_generator_checkpoint_is_refused_naming_the_discriminator(pretraining_run, tmp_path):
    result = run_glue_cli(
        "--model_name_or_path", str(pretraining_run / "generator"), output_dir=tmp_path / "out"
    )
    check_refused(result, "masked-LM (generator)", f"--model_name_or_path {pretraining_run / 'discriminator'}",
                  "--allow_generator")  # fmt: skip
    assert not (tmp_path / "out").exists()
    # With the flag it passes the checks, and its results are filed apart from the discriminator's.
    args = run_glue.parse_args(["--model_name_or_path", str(pretraining_run / "generator"), "--task_name", "rte",
                                "--output_dir", str(tmp_path / "out"), "--allow_generator"])  # fmt: skip
    assert run_glue.check_inputs(args, tmp_path).kind == "model"
    assert run_glue.default_model_name(str(pretraining_run / "generator")) == "my_run_generator"
    assert run_glue.default_model_name(str(pretraining_run / "discriminator")) == "my_run"


def test_missing_model_path_names_the_flag(tmp_path):
    result = run_glue_cli(
        "--model_name_or_path", str(tmp_path / "no" / "such" / "ckpt"), output_dir=tmp_path / "out"
    )
    check_refused(result, f"--model_name_or_path {tmp_path / 'no' / 'such' / 'ckpt'}: no such directory")
    assert "Repo id" not in result.stderr and not (tmp_path / "out").exists()


def main_error(capsys, *argv: str) -> str:
    assert run_glue.main(["--glue_dir", str(GLUE_FIXTURES), "--task_name", "rte", *argv]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("run_glue.py: error: ")
    return message


def test_directory_without_vocabulary(pretraining_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((pretraining_run / "discriminator" / name).read_bytes())
    out = tmp_path / "out"
    message = main_error(capsys, "--model_name_or_path", str(bare), "--output_dir", str(out))
    assert f"--model_name_or_path {bare} holds no tokenizer" in message and "--tokenizer_name" in message
    assert "sentencepiece" not in message
    message = main_error(capsys, "--model_name_or_path", str(pretraining_run), "--tokenizer_name", str(bare),
                         "--output_dir", str(out))  # fmt: skip
    assert f"--tokenizer_name {bare} holds no tokenizer" in message
    # A missing tokenizer directory is named as such, not as a malformed Hub repo id.
    message = main_error(capsys, "--model_name_or_path", str(pretraining_run), "--tokenizer_name",
                         str(tmp_path / "a" / "b" / "vocab"), "--output_dir", str(out))  # fmt: skip
    assert "--tokenizer_name" in message and "does not exist" in message
    assert not out.exists()


def test_output_directory_that_cannot_be_written(pretraining_run, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = main_error(
        capsys, "--model_name_or_path", str(pretraining_run), "--output_dir", str(blocker / "out")
    )
    assert f"--output_dir {blocker / 'out'}" in message and "is not a folder" in message
    assert "--train_file" not in message
    # A read-only directory (root ignores file modes, so os.access is what reports it).
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only)
    message = main_error(
        capsys, "--model_name_or_path", str(pretraining_run), "--output_dir", str(read_only / "glue")
    )
    assert f"--output_dir {read_only / 'glue'}" in message and "not writable" in message
    assert not (read_only / "glue").exists()


def test_other_errors_keep_their_traceback(pretraining_run, tmp_path, monkeypatch):
    """Only bad input is turned into a one-line message: a bug stays visible."""

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(run_glue, "check_inputs", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_glue.main(["--model_name_or_path", str(pretraining_run), "--task_name", "rte"])
