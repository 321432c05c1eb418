"""Preemption-safe GLUE: a stop signal saves a Trainer checkpoint and exits 75; the same command resumes it
and finishes with the metrics of an uninterrupted run. W&B (offline) keeps one run id across the stop."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import glue_training
import run_glue
import test_run_glue
from provenance import PROVENANCE_FILE
from run_state import REQUEUE_EXIT_CODE
from test_run_glue import GLUE_FIXTURES

moe_checkpoint = test_run_glue.moe_checkpoint  # the fixture: a tiny 4-expert checkpoint, made once a session
# Keys of eval_results.json that depend on the wall clock, not on the model.
TIMING = ("runtime", "per_second")


def glue(checkpoint: Path, output_dir: Path, *extra: str) -> int:
    return run_glue.main(["--model_name_or_path", str(checkpoint), "--glue_dir", str(GLUE_FIXTURES),
                          "--output_dir", str(output_dir), "--task_name", "rte", "--seed", "3",
                          "--per_device_train_batch_size", "4", "--num_train_epochs", "2", "--save_steps", "2",
                          "--logging_steps", "1", *extra])  # fmt: skip


def signal_at_step(monkeypatch, step: int, signum: int = signal.SIGUSR1) -> None:
    """Send this process `signum` at the end of optimizer step `step`, as Slurm would during training."""
    original = glue_training.StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            os.kill(os.getpid(), signum)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(glue_training.StopOnSignal, "on_step_end", on_step_end)


def model_metrics(run_dir: Path) -> dict:
    results = json.loads((run_dir / "eval_results.json").read_text())
    return {key: value for key, value in results.items() if not key.endswith(TIMING)}


@pytest.mark.slow
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(moe_checkpoint, tmp_path, monkeypatch):
    checkpoint = moe_checkpoint
    torch.set_num_threads(1)
    assert glue(checkpoint, tmp_path / "whole") == 0
    whole = tmp_path / "whole" / "tiny_moe" / "rte" / "seed_3"

    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, signal.SIGTERM)
        assert glue(checkpoint, tmp_path / "split") == REQUEUE_EXIT_CODE
    run_dir = tmp_path / "split" / "tiny_moe" / "rte" / "seed_3"
    assert (run_dir / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (run_dir / "eval_results.json").exists() and not (run_dir / "run_config.json").exists()
    # A checkpoint cut short by a kill mid-save is set aside, not resumed from.
    (run_dir / "checkpoint-5").mkdir()
    (run_dir / "checkpoint-5" / "trainer_state.json").write_text("{")

    steps = []
    with monkeypatch.context() as patch:
        original = glue_training.StopOnSignal.on_step_end
        patch.setattr(glue_training.StopOnSignal, "on_step_end",
                      lambda self, args, state, *rest, **kw: steps.append(state.global_step) or original(self, args, state, *rest, **kw))  # fmt: skip
        assert glue(checkpoint, tmp_path / "split") == 0
    assert steps[0] == 4, "the second run goes on after the checkpoint"
    assert model_metrics(run_dir) == model_metrics(whole)
    history = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r][:3] == [1, 2, 3]  # the log goes on from the checkpoint
    assert not [p.name for p in run_dir.iterdir() if "checkpoint-" in p.name], (
        "a finished run keeps no checkpoint"
    )
    provenance = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert provenance["command"][:3] == ["run_glue.py", "--model_name_or_path", str(checkpoint)]
    assert provenance["transformers"] and len(provenance["git_commit"] or "x" * 40) == 40
    # Finished: run again, it is refused (Run_GLUE_Evaluation.sh skips it before that).
    assert glue(checkpoint, tmp_path / "split") == 1


@pytest.mark.slow
def test_wandb_run_id_survives_a_stop_and_resume(moe_checkpoint, tmp_path, monkeypatch):
    checkpoint = moe_checkpoint
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb reads the environment at its first setup in a process (here, or an earlier test's run): the
    # GLUE run's folder and id must not depend on what it read then.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    wandb.setup()
    with monkeypatch.context() as patch:
        signal_at_step(patch, 2)
        assert glue(checkpoint, tmp_path, "--report_to", "wandb") == REQUEUE_EXIT_CODE
    run_dir = tmp_path / "tiny_moe" / "rte" / "seed_3"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert glue(checkpoint, tmp_path, "--report_to", "wandb") == 0
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<run id>, with "-1" added by wandb when both runs start in the same second
    run_ids = [name.split("-")[3] for name in offline_runs]
    assert run_ids == [run_id, run_id], offline_runs
    assert not list(tmp_path.glob("elsewhere/**/offline-run-*"))
    assert "WANDB_RUN_ID" not in os.environ
