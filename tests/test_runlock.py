"""One writer per run folder (runlock.py): a second process is refused naming the holder's PID, a killed
holder never blocks, and both trainers take the lock before touching their folders."""

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import modeling_electra
import run_glue
import runlock
import wikitext_trainer
from conftest import REPO_ROOT
from glue_tasks import glue_run_dir
from input_checks import InputError
from modeling_electra_config import ElectraMoEConfig
from pretrain_utils import trainer_argv
from test_bad_inputs import TINY

HOLD = "import sys, time, runlock; from pathlib import Path\nwith runlock.run_lock(Path(sys.argv[1]), '--x', '--y'):\n    print('locked', flush=True); time.sleep(120)"  # fmt: skip


def start_holder(folder: Path) -> subprocess.Popen:
    """A process that holds `folder`'s lock until killed; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def wait_for_lock_file(folder: Path, timeout: float = 120) -> str:
    """The PID a run writes into its lock file, once it holds the lock."""
    path, deadline = runlock.lock_path(folder), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"no lock file {path} after {timeout} s")


def test_a_second_holder_is_refused_with_the_pid_and_a_killed_one_does_not_block(tmp_path):
    folder = tmp_path / "out" / "run"
    holder = start_holder(folder)
    try:
        refused = pytest.raises(InputError, match=rf"in use by process {holder.pid}\b.*choose another --y")
        with refused, runlock.run_lock(folder, "--x", "--y"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runlock.lock_path(folder).is_file()  # left behind by the killed holder ...
    with runlock.run_lock(folder, "--x", "--y"):  # ... and simply locked again
        assert runlock.lock_path(folder).read_text().strip() == str(os.getpid())
    assert not runlock.lock_path(folder).exists()


def test_release_removes_the_lock_file_and_the_folders_made_for_it(tmp_path):
    with runlock.run_lock(tmp_path / "a" / "b" / "run", "--x", "--y"):
        assert (tmp_path / "a" / "b").is_dir()
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_process_locks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not runlock.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert runlock.is_main_process()


def test_a_second_pretraining_run_into_one_folder_is_refused_naming_the_first(tmp_path, vocab_dir):
    argv = trainer_argv(tmp_path, vocab_dir, "--max_training_steps", "100000", "--eval_steps", "100000",
                        "--save_steps", "100000", "--logging_steps", "1000")  # fmt: skip
    first = subprocess.Popen([sys.executable, "wikitext_trainer.py", *argv], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_for_lock_file(tmp_path / "out" / "run") == str(first.pid)
        stderr = io.StringIO()  # the second run in-process: its checks come before anything heavy
        with redirect_stderr(stderr), pytest.raises(SystemExit) as refused:
            wikitext_trainer.main([*argv, "--seed", "2"])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert refused.value.code == 2
    (line,) = [line for line in stderr.getvalue().splitlines() if "error:" in line]
    assert f"in use by process {first.pid}" in line and "--model_save_name" in line
    assert "Traceback" not in stderr.getvalue()


def test_a_glue_cell_held_by_another_process_is_refused_before_anything_is_written(tmp_path, vocab_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    model_dir = tmp_path / "tiny"
    config = ElectraMoEConfig(vocab_size=tokenizer.vocab_size, **TINY)
    modeling_electra.ElectraMoEForPreTraining(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "glue"
    holder = start_holder(glue_run_dir(out, "tiny", "rte", 2))
    argv = ["--model_name_or_path", str(model_dir), "--glue_dir", str(REPO_ROOT / "tests" / "fixtures" / "glue"),
            "--task_name", "rte", "--seed", "1", "2", "--max_seq_length", "64", "--output_dir", str(out)]  # fmt: skip
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            status = run_glue.main(argv)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert status == 2
    (line,) = stderr.getvalue().strip().splitlines()
    assert f"in use by process {holder.pid}" in line and "seed_2" in line
    assert not glue_run_dir(out, "tiny", "rte", 1).exists()  # the free cell was not started either
