"""Experiment trackers: `--report_to {tensorboard,wandb,all,none}` for pretraining (accelerate's trackers)
and the W&B run id kept in a run folder, so that a requeued run goes on logging to the same W&B run.

W&B is optional (`pip install wandb`); with WANDB_MODE=offline it writes under the run folder only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from outputs import write_text_atomically

REPORT_TO_CHOICES = ("tensorboard", "wandb", "all", "none")
TRACKERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"
WANDB_PROJECT = "electra-moe"
TENSORBOARD_DIR = "tensorboard"


def trackers(report_to: str | list[str] | None) -> list[str]:
    """The trackers `--report_to` names: `all` is every one installed, `none` (or nothing) is none."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        return [name for name in TRACKERS if tracker_installed(name)]
    return [name for name in names if name != "none"]


def tracker_installed(name: str) -> bool:
    import importlib.util

    module = "tensorboard" if name == "tensorboard" else "wandb"
    return importlib.util.find_spec(module) is not None


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: read from `<run_dir>/wandb_run_id`, or made and written there."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    write_text_atomically(path, run_id + "\n")
    return run_id


def start_trackers(accelerator: Any, report_to: str, run_dir: Path, run_name: str) -> None:
    """Start the pretraining run's trackers on the main process: TensorBoard in `<run_dir>/tensorboard/`
    (as before the flag), W&B in project $WANDB_PROJECT (default electra-moe) under the run folder's own
    run id, resumed after a requeue."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    if not accelerator.is_main_process:
        return
    started = []
    for name in trackers(report_to):
        if name == "tensorboard":
            started.append(TensorBoardTracker(TENSORBOARD_DIR, str(run_dir)))
        else:
            project = os.environ.get("WANDB_PROJECT", WANDB_PROJECT)
            run_id = wandb_run_id(run_dir)
            started.append(WandBTracker(project, id=run_id, resume="allow", name=run_name, dir=str(run_dir)))
    # accelerate starts the tracker objects it is given; its own names would share one project name.
    accelerator.log_with = started
    accelerator.init_trackers(TENSORBOARD_DIR)


@contextmanager
def wandb_run(
    run_dir: Path, report_to: list[str], run_name: str | None, main_process: bool = True
) -> Iterator[None]:
    """For the transformers Trainer's W&B callback: the W&B run of the run folder's run id (resumed after a
    requeue, its files under `<run_dir>/wandb/`) started before the block, so that the callback logs to it,
    and finished after it, so that the next (task, seed) starts its own. The run is started with explicit
    arguments, not WANDB_RUN_ID / WANDB_DIR: wandb reads the environment once a process (at its first
    setup), so a second run in the same process would otherwise get a fresh id in the first run's folder."""
    if "wandb" not in report_to or not main_process:
        yield
        return
    import wandb

    project = os.environ.get("WANDB_PROJECT", WANDB_PROJECT)
    wandb.init(project=project, id=wandb_run_id(run_dir), resume="allow", dir=str(run_dir), name=run_name)
    try:
        yield
    finally:
        if wandb.run is not None:
            wandb.finish()
