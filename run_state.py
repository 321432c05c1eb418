"""Run state of a pretraining run: its folder, checkpoints, stop signals and metric files.

A run folder `<model_save_directory>/<model_save_name>/` holds `training_args.json`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/checkpoint-<step>/` (the newest `--save_total_limit` kept) and, once finished,
`discriminator/` and `generator/`. Checkpoints are written under a temporary name and renamed into place,
so a kill at any point leaves only complete checkpoints behind; SIGTERM/SIGUSR1 end the run with a
checkpoint and exit status 75, and `--resume_from_checkpoint auto` continues it exactly.

A resume is checked first: the checkpoint against its `manifest.json` (sizes and SHA-256; `auto` falls
back to the newest one that verifies), the run-defining flags against `training_args.json`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from input_checks import InputError, finished_run_model, holds_files, nearest_existing
from modeling_electra_config import CHANGEABLE_ON_RESUME_FIELDS
from outputs import (
    publish,
    read_jsonl,
    remove,
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "try again", what a Slurm job script requeues on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
TRAINING_ARGS_FILE = "training_args.json"
MANIFEST_FILE = "manifest.json"
CORRUPT_CHECKPOINT_PREFIX = "corrupt-checkpoint-"
# What a checkpoint holds besides the RNG states of each process (random_states_<rank>.pkl).
CHECKPOINT_FILES = ("pytorch_model.bin", "optimizer.bin", TRAINER_STATE_FILE)
# Errors that mean the disk is full or the file too large for it (ENOSPC, EDQUOT, EFBIG). torch.save reports
# them as a RuntimeError from its zip writer, safetensors as an error quoting the OS error number.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_MARKERS = ("inline_container", "file write failed", *(f"os error {n})" for n in DISK_FULL_ERRNOS))


class WriteError(InputError):
    """A run file could not be written because the disk is full: reported in one line, exit status 2."""


# --- The run folder -------------------------------------------------------------------------------------------


def check_run_dir(args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse to clobber a finished run, or to restart an unfinished one without saying resume or overwrite."""
    if not run_dir.exists() or args.overwrite_output_dir:
        return
    if finished_run_model(run_dir):
        raise InputError(
            f"{run_dir} already holds a finished run; pass --overwrite_output_dir or another --model_save_name"
        )
    if args.resume_from_checkpoint is None and holds_files(run_dir):
        raise InputError(
            f"{run_dir} holds an unfinished run; pass --resume_from_checkpoint auto to continue it "
            "or --overwrite_output_dir to start over"
        )


def start_run_dir(run_dir: Path, overwrite: bool, resolved_args: dict[str, Any]) -> None:
    """Create (or empty, with --overwrite_output_dir) the run folder, remove what a killed save left behind
    and record the resolved arguments."""
    with reporting_write_errors(run_dir):
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        write_json_atomically(run_dir / TRAINING_ARGS_FILE, resolved_args)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Folders a killed save left behind: `checkpoints/tmp-checkpoint-*`, and the `.tmp-*` and `.old-*` of
    `outputs.write_atomically` / `publish` (final models, a checkpoint written again)."""
    stale = [*(run_dir / CHECKPOINT_DIR).glob(f"{TMP_CHECKPOINT_PREFIX}*")]
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        stale += [*folder.glob(".tmp-*"), *folder.glob(".old-*")]
    for path in stale:
        remove(path)


@contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn a full disk (or a file-size limit) while writing `path` into a one-line WriteError."""
    try:
        yield
    except Exception as error:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            raise WriteError(disk_full_message(path, error.strerror)) from error
        text = str(error)
        if not isinstance(error, OSError) and any(marker in text for marker in DISK_FULL_MARKERS):
            torch_zip = "os error" not in text  # torch's zip writer says where in its C++ source it failed
            reason = "torch.save could not write its file" if torch_zip else text.splitlines()[0][:200]
            raise WriteError(disk_full_message(path, reason)) from error
        raise


def disk_full_message(path: Path, reason: str) -> str:
    free = shutil.disk_usage(nearest_existing(path)).free / 2**30
    return (
        f"could not write {path} ({reason}): the disk is probably full ({free:.1f} GiB free there); "
        "free some space or pass another --model_save_directory, then resume with --resume_from_checkpoint auto"
    )


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

    `trainer_state.json` (step and data position) and then `manifest.json` (size and checksum of every file)
    are written last, just before the rename, so a kill at any point leaves either the previous checkpoints
    untouched or a `tmp-checkpoint-*` folder that resume ignores; a resume verifies the manifest.
    """
    root = run_dir / CHECKPOINT_DIR
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with reporting_write_errors(tmp):
            # Pickled (not safetensors): the shared generator/discriminator embeddings round-trip as one tensor.
            accelerator.save_state(str(tmp), safe_serialization=False)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_trainer_state(tmp, state)
                write_manifest(tmp)
    except WriteError:
        if accelerator.is_main_process:
            remove(tmp)  # give the space back; the previous checkpoints stay as they were
        raise
    if accelerator.is_main_process:
        publish(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("Saved checkpoint %s", final)
    return final


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names, verified against its manifest.

    `auto` takes this run's newest checkpoint that verifies (None if the run has none), warning about each
    newer one that does not; an explicit PATH that does not verify is an error naming the file.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise InputError(
                f"--resume_from_checkpoint {resume} is not a complete checkpoint (no {TRAINER_STATE_FILE})"
            )
        problem = checkpoint_problem(path)
        if problem:
            raise InputError(f"--resume_from_checkpoint {resume} is corrupt: {problem}")
        return path
    checkpoints = list_checkpoints(run_dir)
    for index in range(len(checkpoints) - 1, -1, -1):
        _, path = checkpoints[index]
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        fallback = checkpoints[index - 1][1].name if index else "none left"
        logger.warning(
            "Skipping corrupt checkpoint %s (%s); falling back to %s", path.name, problem, fallback
        )
    if checkpoints:
        raise InputError(
            f"no checkpoint of {run_dir} verifies (see the warnings above); pass --overwrite_output_dir to start over"
        )
    return None


def set_aside_newer_checkpoints(run_dir: Path, resumed: Path) -> None:
    """After `auto` fell back past corrupt checkpoints, rename them `corrupt-checkpoint-<step>`: rotation
    and later resumes never take them, and they stay for inspection."""
    resumed_step = int(CHECKPOINT_PATTERN.match(resumed.name).group(1))
    for step, path in list_checkpoints(run_dir):
        if step > resumed_step:
            target = path.with_name(f"{CORRUPT_CHECKPOINT_PREFIX}{step}")
            remove(target)
            path.rename(target)
            logger.warning("Renamed the corrupt checkpoint %s to %s", path, target.name)


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(directory: Path) -> None:
    """`manifest.json`: size and SHA-256 of every file of the checkpoint; written last, it marks it complete."""
    files = {p.name: file_digest(p) for p in sorted(directory.iterdir()) if p.is_file()}
    write_json_atomically(directory / MANIFEST_FILE, {"files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (naming the file), or None when it verifies."""
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():  # written before manifests existed: the files must at least be there
        for name in [*CHECKPOINT_FILES, "random_states_0.pkl"]:
            path = checkpoint / name
            if not path.is_file() or path.stat().st_size == 0:
                return f"{path} is missing or empty"
        return None
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is not a valid manifest"
    for name, entry in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        actual = file_digest(path)
        if actual["size"] != entry["size"]:
            return f"{path} has {actual['size']} bytes, the manifest says {entry['size']}"
        if actual["sha256"] != entry["sha256"]:
            return f"{path} does not match its checksum in {MANIFEST_FILE}"
    return None


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


# --- Resuming: the flags that define the run must match the ones it was started with -------------------------

# May differ on resume: where and how often things are logged, evaluated and saved, and how data is prepared ...
BOOKKEEPING_FLAGS = frozenset(
    {
        "logging_steps", "eval_steps", "save_steps", "save_total_limit", "preprocessing_num_workers",
        "data_cache_dir", "model_save_directory", "model_save_name", "resume_from_checkpoint",
        "overwrite_output_dir", "push_to_hub", "hub_model_id", "gradient_checkpointing", "compile",
    }
)  # fmt: skip
# ... and the model hyperparameters declared `changeable_on_resume` (modeling_electra_config.py).
CHANGEABLE_ON_RESUME = BOOKKEEPING_FLAGS | CHANGEABLE_ON_RESUME_FIELDS
# What a run recorded before these flags existed did: a record without them is compared with these values.
FLAG_VALUES_BEFORE_THE_FLAG = {"lr_schedule": "linear", "example_format": "packed"}
# The step limit may only rise; these follow from it and from run-defining flags already compared.
STEP_LIMIT_FLAGS = ("max_training_steps", "num_epochs")
DERIVED_FROM_COMPARED = frozenset({"total_steps", "steps_per_epoch", "validation_blocks"})


def check_resume_args(
    run_dir: Path, checkpoint: Path, flags: dict[str, Any], derived: dict[str, Any]
) -> None:
    """Refuse a resume whose run-defining values differ from those recorded when the run started.

    The record is the run's `training_args.json` (or, resuming another run's checkpoint into a new folder,
    that run's). `flags` are the command-line values, `derived` the values that follow from the data and
    the processes (vocabulary size, blocks, steps). Every difference is listed in one InputError; keys the
    record lacks (flags added since) are not compared, except those whose behaviour before the flag
    existed differs from today's default (FLAG_VALUES_BEFORE_THE_FLAG).
    """
    # This folder's record and, for another run's checkpoint, that run's: a checkpoint of another model must
    # not be loaded into this folder's run (nor rewrite its training_args.json).
    records = dict.fromkeys(
        record.resolve()
        for record in (run_dir / TRAINING_ARGS_FILE, checkpoint.parent.parent / TRAINING_ARGS_FILE)
        if record.is_file()
    )
    if not records:
        logger.warning(
            "No %s to compare the flags with: resuming %s unchecked", TRAINING_ARGS_FILE, checkpoint
        )
    for record in records:
        check_against_record(record, flags, derived)


def check_against_record(record: Path, flags: dict[str, Any], derived: dict[str, Any]) -> None:
    """Every run-defining difference between `record` (a training_args.json) and this run, in one InputError."""
    try:
        saved = json.loads(record.read_text())
    except ValueError as error:
        raise InputError(f"{record} is not valid JSON ({error}); it records the run's flags") from error
    saved = {**FLAG_VALUES_BEFORE_THE_FLAG, **saved}
    now = {**flags, **derived}
    ignored = CHANGEABLE_ON_RESUME | DERIVED_FROM_COMPARED | set(STEP_LIMIT_FLAGS)
    changes = [
        f"{'--' if key in flags else ''}{key} {saved[key]} -> {value}"
        for key, value in now.items()
        if key in saved and key not in ignored and saved[key] != value
    ]
    if now["total_steps"] < saved.get("total_steps", 0):
        limits = [
            f"--{key} {saved.get(key)} -> {now[key]}"
            for key in STEP_LIMIT_FLAGS
            if saved.get(key) != now[key]
        ]
        limits = limits or [f"total_steps {saved['total_steps']} -> {now['total_steps']}"]
        changes += [f"{', '.join(limits)} (the step limit may only be raised)"]
    if changes:
        raise InputError(
            f"the run recorded in {record} was started with other values: {'; '.join(changes)}. "
            "Resume with the recorded values or start a new run (another --model_save_name)"
        )


# --- Final models: discriminator/ (what run_glue.py takes) and generator/, each with the tokenizer -----------


def save_final_models(model: Any, tokenizer: Any, run_dir: Path) -> None:
    """Write generator/ and discriminator/ (last, it marks the run finished) via temp dirs and renames."""
    for name in ("generator", "discriminator"):
        save = partial(save_pretrained_with_tokenizer, getattr(model, name), tokenizer)
        write_atomically(run_dir / name, save, replace=True)


def save_pretrained_with_tokenizer(part: Any, tokenizer: Any, directory: Path) -> None:
    part.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def push_to_hub(model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    repo = args.hub_model_id or args.model_save_name
    for part, repo_id in ((model.discriminator, repo), (model.generator, f"{repo}-generator")):
        part.push_to_hub(repo_id)
        tokenizer.push_to_hub(repo_id)


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
    path = run_dir / METRICS_FILE
    with reporting_write_errors(path), open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int, rewrite: bool = True) -> int:
    """On resume, drop lines logged after the checkpoint (they will be logged again); only the main process
    passes `rewrite`, every process reads.

    Returns the step of the last validation line kept (-1 if none), so that no process evaluates it again.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return -1
    kept = [(line, record) for line, record in read_jsonl(path) if record["step"] <= last_step]
    if rewrite:
        write_text_atomically(path, "".join(line + "\n" for line, _ in kept))
    return max((r["step"] for _, r in kept if r["split"] == "validation"), default=-1)


def tensorboard_scalars(split: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten the metrics for TensorBoard: per-layer lists and per-layer-per-expert values get own tags."""
    scalars = {}
    for name, value in metrics.items():
        if isinstance(value, int | float):
            scalars[f"{split}/{name}"] = value
        elif value and isinstance(value[0], list):  # [MoE layer][expert]: expert_load, experts_per_token
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
