"""Run state of a pretraining run: its folder, checkpoints, stop signals and metric files.

A run folder `<model_save_directory>/<model_save_name>/` holds `training_args.json`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/checkpoint-<step>/` (the newest `--save_total_limit` kept) and, once finished,
`discriminator/` and `generator/`. Checkpoints are written under a temporary name and renamed into place,
so a kill at any point leaves only complete checkpoints behind; SIGTERM/SIGUSR1 end the run with a
checkpoint and exit status 75, and `--resume_from_checkpoint auto` continues it exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from outputs import write_json_atomically, write_text_atomically
from pretrain_data import InputError

logger = logging.getLogger("wikitext_trainer")

REQUEUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "try again", what a Slurm job script requeues on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
TRAINING_ARGS_FILE = "training_args.json"


# --- The run folder -------------------------------------------------------------------------------------------


def check_run_dir(args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse to clobber a finished run, or to restart an unfinished one without saying resume or overwrite."""
    if not run_dir.exists() or args.overwrite_output_dir:
        return
    if (run_dir / "discriminator" / "config.json").is_file():
        raise InputError(
            f"{run_dir} already holds a finished run; pass --overwrite_output_dir or another --model_save_name"
        )
    if args.resume_from_checkpoint is None and any(run_dir.iterdir()):
        raise InputError(
            f"{run_dir} holds an unfinished run; pass --resume_from_checkpoint auto to continue it "
            "or --overwrite_output_dir to start over"
        )


def start_run_dir(run_dir: Path, overwrite: bool, resolved_args: dict[str, Any]) -> None:
    """Create (or empty, with --overwrite_output_dir) the run folder and record the resolved arguments."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / CHECKPOINT_DIR).glob(f"{TMP_CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    write_json_atomically(run_dir / TRAINING_ARGS_FILE, resolved_args)


# --- Checkpoints ----------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with trainer state), oldest first."""
    root = run_dir / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / TRAINER_STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    write_json_atomically(directory / TRAINER_STATE_FILE, state)


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], save_total_limit: int) -> Path:
    """Model, optimizer, scheduler and every process's RNG states, written to a temp dir then renamed.

    `trainer_state.json` (step and data position) is written last, just before the rename, so a kill at any
    point leaves either the previous checkpoints untouched or a `tmp-checkpoint-*` folder that resume ignores.
    """
    root = run_dir / CHECKPOINT_DIR
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Pickled (not safetensors): the shared generator/discriminator embeddings round-trip as one tensor.
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_trainer_state(tmp, state)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for _, old in list_checkpoints(run_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("Saved checkpoint %s", final)
    return final


def resolve_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: `auto` = this run's latest (None if it has none)."""
    if resume is None:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise InputError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint (no {TRAINER_STATE_FILE})"
        )
    return path


def load_checkpoint(accelerator: Any, checkpoint: Path) -> dict[str, int]:
    """Restore model, optimizer, scheduler and RNG states; returns the position (global_step, epoch, batch)."""
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    logger.info(
        "Resumed from %s at step %d (epoch %d, batch %d)",
        checkpoint,
        state["global_step"],
        state["epoch"],
        state["batch_index"],
    )
    return {key: state[key] for key in ("global_step", "epoch", "batch_index")}


def rng_devices(accelerator: Any) -> list[int]:
    """The CUDA device whose RNG `torch.random.fork_rng` must save (none on CPU)."""
    return [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []


# --- Stop signals ---------------------------------------------------------------------------------------------


class StopRequest:
    """Records SIGTERM/SIGUSR1; the training loop checkpoints at the next step boundary and exits 75."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


@contextmanager
def stop_signal_handlers(request: StopRequest) -> Iterator[None]:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, request)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested(stop: StopRequest, accelerator: Any) -> bool:
    """True on every process once any process got a stop signal."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    flag = torch.tensor(float(stop.signal is not None), device=accelerator.device)
    flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag.item() > 0)


# --- Metric files ---------------------------------------------------------------------------------------------


def write_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def tensorboard_scalars(split: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten the metrics for TensorBoard: per-layer lists and per-layer-per-expert loads get own tags."""
    scalars = {}
    for name, value in metrics.items():
        if isinstance(value, int | float):
            scalars[f"{split}/{name}"] = value
        elif name.endswith("expert_load"):
            for layer, loads in enumerate(value):
                for expert, load in enumerate(loads):
                    scalars[f"{split}/{name}/layer{layer}/expert{expert}"] = load
        elif isinstance(value, list):
            for layer, item in enumerate(value):
                scalars[f"{split}/{name}/layer{layer}"] = item
    return scalars


def log_metrics(
    accelerator: Any, run_dir: Path, step: int, epoch: int, split: str, metrics: dict[str, Any]
) -> None:
    """One line of metrics.jsonl (main process), the TensorBoard scalars, and a log line for evaluations."""
    record = {"step": step, "epoch": epoch, "split": split, **metrics}
    if accelerator.is_main_process:
        write_metrics(run_dir, record)
    accelerator.log(tensorboard_scalars(split, metrics), step=step)
    if split != "train":
        logger.info(
            "step %d %s: loss %.4f, gen_accuracy %.3f, disc_accuracy %.3f, disc_f1 %.3f",
            step,
            split,
            metrics["loss"],
            metrics["gen_accuracy"],
            metrics["disc_accuracy"],
            metrics["disc_f1"],
        )
