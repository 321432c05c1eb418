"""Checkpoint/resume: a SIGTERM'd and resumed run ends with exactly the weights of an uninterrupted run,
a crash during a save falls back to the previous checkpoint, and SIGUSR1 exits with the requeue status."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import run_state
import wikitext_trainer as wt
from conftest import REPO_ROOT
from pretrain_utils import assert_same_weights, final_weights, read_metrics, trainer_argv

TOTAL_STEPS = 8
# Two micro-batches per step exercise the accumulation boundary; noisy top-k routing draws random numbers
# in every MoE layer, so an RNG state that is not restored changes the weights.
RESUME_FLAGS = [
    "--max_training_steps", str(TOTAL_STEPS), "--batch_size", "4", "--gradient_accumulation_steps", "2",
    "--save_steps", "3", "--eval_steps", "4", "--num_experts", "2", "--top_k", "1", "--router_type", "noisy_topk",
    "--learning_rate", "2e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vocab_dir):
    """The uninterrupted run: (root, cache dir, final weights, train metrics)."""
    root = tmp_path_factory.mktemp("reference")
    assert wt.main(trainer_argv(root, vocab_dir, *RESUME_FLAGS)) == 0
    run_dir = root / "out" / "run"
    return root / "cache", final_weights(run_dir), read_metrics(run_dir, "train")


def metrics_without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "grad_norm")} for r in records]


def test_sigterm_checkpoints_exits_75_and_resume_matches_the_uninterrupted_run(
    reference, tmp_path, vocab_dir, monkeypatch
):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    cache, expected_weights, expected_metrics = reference
    argv = trainer_argv(tmp_path, vocab_dir, *RESUME_FLAGS, cache=cache)
    write_metrics = run_state.write_metrics

    def signal_after_step_4(run_dir, record):
        write_metrics(run_dir, record)
        if record["step"] == 4 and record["split"] == "train":
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the trainer's handler

    monkeypatch.setattr(run_state, "write_metrics", signal_after_step_4)
    assert wt.main(argv) == run_state.REQUEUE_EXIT_CODE
    run_dir = tmp_path / "out" / "run"
    assert [step for step, _ in run_state.list_checkpoints(run_dir)] == [3, 4]
    assert not (run_dir / "discriminator").exists(), "an interrupted run must not look finished"

    monkeypatch.setattr(run_state, "write_metrics", write_metrics)
    assert wt.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert_same_weights(final_weights(run_dir), expected_weights)
    resumed = read_metrics(run_dir, "train")
    assert [r["step"] for r in resumed] == list(range(1, TOTAL_STEPS + 1))
    assert metrics_without_timing(resumed) == metrics_without_timing(expected_metrics)


def test_a_crash_during_a_save_resumes_from_the_previous_checkpoint(
    reference, tmp_path, vocab_dir, monkeypatch, caplog
):
    cache, expected_weights, _ = reference
    argv = trainer_argv(tmp_path, vocab_dir, *RESUME_FLAGS, cache=cache)
    write_trainer_state = run_state.write_trainer_state

    def crash_while_saving_step_6(directory, state):
        if state["global_step"] == 6:
            raise RuntimeError("simulated kill during checkpoint save")
        write_trainer_state(directory, state)

    monkeypatch.setattr(run_state, "write_trainer_state", crash_while_saving_step_6)
    with pytest.raises(RuntimeError, match="simulated kill"):
        wt.main(argv)
    run_dir = tmp_path / "out" / "run"
    partial = run_dir / "checkpoints" / "tmp-checkpoint-6"
    assert partial.is_dir() and any(partial.iterdir()), "the save should have been cut off half-way"
    assert [step for step, _ in run_state.list_checkpoints(run_dir)] == [3]

    monkeypatch.setattr(run_state, "write_trainer_state", write_trainer_state)
    caplog.set_level("INFO", logger="run_state")
    assert wt.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert "checkpoint-3 at step 3" in caplog.text
    assert not partial.exists(), "the stale temporary checkpoint is cleaned up"
    assert_same_weights(final_weights(run_dir), expected_weights)


def test_checkpoints_rotate_and_resume_refuses_an_incomplete_path(tmp_path, vocab_dir, capsys):
    argv = trainer_argv(
        tmp_path, vocab_dir, "--max_training_steps", "5", "--save_steps", "1", "--save_total_limit", "2"
    )
    assert wt.main(argv) == 0
    run_dir = tmp_path / "out" / "run"
    assert [step for step, _ in run_state.list_checkpoints(run_dir)] == [4, 5]
    state = json.loads((run_dir / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5

    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    other = trainer_argv(
        tmp_path, vocab_dir, "--max_training_steps", "5", "--resume_from_checkpoint", str(bad)
    )
    with pytest.raises(SystemExit):
        wt.main([*other, "--model_save_name", "other"])
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_sigusr1_in_a_real_process_checkpoints_and_exits_with_the_requeue_status(tmp_path, vocab_dir):
    """The script run as Slurm runs it: a signal from outside, a checkpoint, exit status 75."""
    argv = trainer_argv(tmp_path, vocab_dir, "--max_training_steps", "100000", "--save_steps", "100000")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "wikitext_trainer.py"), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    run_dir = tmp_path / "out" / "run"
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert process.poll() is None, f"trainer exited early: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "trainer did not start training in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == run_state.REQUEUE_EXIT_CODE, stderr[-2000:]
    checkpoints = run_state.list_checkpoints(run_dir)
    assert len(checkpoints) == 1
    step, path = checkpoints[0]
    assert step >= 1 and (path / "optimizer.bin").is_file()
    assert "Stop signal received" in stderr
