"""run_glue.py's data, training and output steps: GLUE splits to token ids, the Trainer with ELECTRA's
layer-wise learning-rate decay and schedule, preemption (stop signals, checkpoints to resume from), and the
result files (metrics and GLUE-server submissions)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback

import modeling_electra
from glue_tasks import (
    DIAGNOSTIC_TASK,
    MISMATCHED_SUFFIX,
    NO_LABEL,
    TASKS,
    GlueTask,
    SplitData,
    glue_metrics,
    load_file_split,
    load_glue_dir_split,
)
from optimization import make_schedule
from outputs import write_json_atomically, write_text_atomically
from run_state import StopRequest

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
# Model outputs that are router statistics, not predictions: left out when the Trainer gathers logits.
NON_PREDICTION_OUTPUTS = ["hidden_states", "attentions", *modeling_electra.ROUTER_FIELDS]
ENCODER_LAYER_PATTERN = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
# The Trainer's checkpoints in a (task, seed) run folder, and what a complete one holds.
TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
TRAINER_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
CORRUPT_PREFIX = "corrupt-"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def hub_features(task: GlueTask) -> datasets.Features:
    """The Hub's column types for `task`, so local data and Hub data are interchangeable."""
    label = (
        datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    )
    text = {column: datasets.Value("string") for column in task.text_columns}
    return datasets.Features({**text, "label": label, "idx": datasets.Value("int32")})


def to_dataset(task: GlueTask, split: SplitData) -> datasets.Dataset:
    return datasets.Dataset.from_dict(split.columns, features=hub_features(task))


def needed_splits(task: GlueTask, args: argparse.Namespace) -> list[str]:
    splits = []
    if args.training.do_train:
        splits.append(task.train_split)
    if args.training.do_eval:
        splits += task.eval_splits
    if args.training.do_predict:
        splits += task.test_splits
    return splits


def load_splits(
    args: argparse.Namespace, task_name: str
) -> tuple[dict[str, datasets.Dataset], dict[str, dict]]:
    """Load the splits this run needs, plus a summary (rows, malformed rows, source) for run_config.json."""
    task = TASKS[task_name]
    wanted = needed_splits(task, args)
    loaded: dict[str, datasets.Dataset] = {}
    summary: dict[str, dict] = {}
    if args.glue_dir is not None or any([args.train_file, args.validation_file, args.test_file]):
        for split in wanted:
            if args.glue_dir is not None:
                data = load_glue_dir_split(args.glue_dir, task_name, split)
            else:
                path = user_file_for_split(args, task, split)
                if path is None:
                    continue
                data = load_file_split(path, task_name, split)
            loaded[split] = to_dataset(task, data)
            summary[split] = {
                "rows": len(data),
                "malformed_rows_skipped": data.num_malformed,
                "source": data.source,
            }
    else:
        try:
            hub = datasets.load_dataset(HUB_DATASET, task_name)
        except Exception as error:
            raise ValueError(
                f"could not load {HUB_DATASET}/{task_name} from the Hugging Face Hub ({error}); offline, "
                "point --glue_dir at the GLUE download or pass --train_file/--validation_file/--test_file"
            ) from error
        for split in wanted:
            loaded[split] = hub[split]
            summary[split] = {
                "rows": len(hub[split]),
                "malformed_rows_skipped": 0,
                "source": f"{HUB_DATASET}/{task_name}",
            }
    return loaded, summary


def user_file_for_split(args: argparse.Namespace, task: GlueTask, split: str) -> Path | None:
    """Map a split to --train_file/--validation_file/--test_file (MNLI: matched sets only)."""
    if split == "train":
        flag, path = "--train_file", args.train_file
    elif split.startswith("validation"):
        flag, path = "--validation_file", args.validation_file
    else:
        flag, path = "--test_file", args.test_file
    if split.endswith("_mismatched"):
        logger.warning("%s: user files give MNLI matched sets only; skipping %s", task.name, split)
        return None
    if path is None:
        raise ValueError(f"task {task.name} needs {flag} for the {split} split (or use --glue_dir / the Hub)")
    return path


def load_diagnostic(args: argparse.Namespace) -> datasets.Dataset | None:
    """The AX diagnostic set, when the data source has it (GLUE's diagnostic/ folder or the Hub's `ax`)."""
    task = TASKS[DIAGNOSTIC_TASK]
    try:
        if args.glue_dir is not None:
            return to_dataset(task, load_glue_dir_split(args.glue_dir, DIAGNOSTIC_TASK, "test"))
        if args.test_file is not None:
            return None
        return datasets.load_dataset(HUB_DATASET, DIAGNOSTIC_TASK)["test"]
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        logger.warning("AX diagnostic set not available (%s); AX.tsv not written", error)
        return None


def limit(dataset: datasets.Dataset, max_samples: int | None, seed: int | None = None) -> datasets.Dataset:
    """Keep `max_samples` rows: a seeded random subset when `seed` is given, else the first rows."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(max_samples))


def tokenize(dataset: datasets.Dataset, task: GlueTask, tokenizer, max_length: int) -> datasets.Dataset:
    """Token ids for the task's sentence (pair); keeps only model inputs and `label`."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(
            *[batch[column] for column in task.text_columns], truncation=True, max_length=max_length
        )

    remove = [c for c in dataset.column_names if c != "label"]
    return dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenizing {task.name}")


def encode_splits(
    args: argparse.Namespace, task: GlueTask, splits: dict[str, datasets.Dataset], tokenizer, seed: int
) -> tuple[dict[str, datasets.Dataset], dict[str, datasets.Dataset]]:
    """The rows each split keeps (train: a seeded subset) and their token ids."""
    train = splits.get("train")
    if train is not None:
        train = limit(train, args.max_train_samples, seed)
        if args.double_unordered and task.unordered_pair:
            train = with_swapped_pairs(train, task)
    raw = {
        "train": train,
        **{s: limit(splits[s], args.max_eval_samples) for s in task.eval_splits if s in splits},
        **{s: limit(splits[s], args.max_predict_samples) for s in task.test_splits if s in splits},
    }
    encoded = {s: tokenize(d, task, tokenizer, args.max_seq_length) for s, d in raw.items() if d is not None}
    if target_scale(args, task) != 1.0:
        encoded = {s: scale_targets(d, task, target_scale(args, task)) for s, d in encoded.items()}
    return raw, encoded


def with_swapped_pairs(dataset: datasets.Dataset, task: GlueTask) -> datasets.Dataset:
    """The rows followed by each row with its two sentences swapped (ELECTRA's `double_unordered`)."""
    first, second = task.text_columns
    swapped = dataset.rename_columns({first: second, second: first}).cast(dataset.features)
    return datasets.concatenate_datasets([dataset, swapped.select_columns(dataset.column_names)])


def scale_targets(dataset: datasets.Dataset, task: GlueTask, scale: float) -> datasets.Dataset:
    """Regression targets divided by `scale`, as ELECTRA trains STS-B (unlabeled rows keep -1)."""
    return dataset.map(
        lambda batch: {"label": [v if v == NO_LABEL else v / scale for v in batch["label"]]},
        batched=True,
        desc=f"scaling {task.name} targets",
    )


def parameter_depth(name: str, num_layers: int) -> int:
    """Depth as in google-research/electra's `_get_layer_lrs`: embeddings 0, layer i i+1, task head n+2."""
    match = ENCODER_LAYER_PATTERN.search(name)
    if match is not None:
        return int(match.group(1)) + 1
    if "embeddings" in name:
        return 0
    return num_layers + 2


def layerwise_param_groups(
    model: nn.Module, learning_rate: float, decay: float, weight_decay: float, decay_names: set[str]
) -> list[dict[str, Any]]:
    """Optimizer groups with lr * decay ** (n_layers + 2 - depth): layers near the input learn slower."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = parameter_depth(name, num_layers)
        decayed = name in decay_names
        key = (depth, decayed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": learning_rate * decay ** (num_layers + 2 - depth),
                "weight_decay": weight_decay if decayed else 0.0,
            }
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


class LayerwiseDecayTrainer(Trainer):
    """The transformers Trainer with ELECTRA's layer-wise learning-rate decay and learning-rate schedule.

    The classification models average their loss over the batch and ignore `num_items_in_batch`, so the
    Trainer divides it by the accumulation steps (transformers' ELECTRA, like ours, would otherwise be taken
    to normalise it itself because its forward accepts **kwargs).
    """

    def __init__(self, *args, layerwise_lr_decay: float, lr_schedule: str = "electra", **kwargs):
        super().__init__(*args, **kwargs)
        self.layerwise_lr_decay = layerwise_lr_decay
        self.lr_schedule = lr_schedule
        self.model_accepts_loss_kwargs = False

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            self.lr_scheduler = make_schedule(
                self.lr_schedule,
                optimizer if optimizer is not None else self.optimizer,
                self.args.get_warmup_steps(num_training_steps),
                num_training_steps,
            )
        return self.lr_scheduler

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = layerwise_param_groups(
                opt_model,
                self.args.learning_rate,
                self.layerwise_lr_decay,
                self.args.weight_decay,
                set(self.get_decay_parameter_names(opt_model)),
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def make_compute_metrics(task: GlueTask, scale: float = 1.0):
    """Metrics on the task's own scale: labels and predictions trained at 1/`scale` are scaled back."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        labels = prediction.label_ids * scale if task.is_regression else prediction.label_ids
        return glue_metrics(task.name, predictions_from_logits(task, logits, scale), labels)

    return compute_metrics


def target_scale(args: argparse.Namespace, task: GlueTask) -> float:
    """What regression targets are divided by for training (STS-B: 5, as ELECTRA; 1 with --no-scale_targets)."""
    return task.target_scale if args.scale_targets else 1.0


def predictions_from_logits(task: GlueTask, logits: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Class ids, or regression scores on the task's own scale (STS-B: 0-5, trained on score / `scale`)."""
    if task.is_regression:
        return np.squeeze(logits, axis=-1) * scale
    return np.argmax(logits, axis=-1)


def write_submission(path: Path, task: GlueTask, idx: list[int], predictions: np.ndarray) -> None:
    """GLUE-server file: header `index<TAB>prediction`; label names for NLI tasks, ints or STS-B floats."""
    as_names = task.name in ("mnli", "qnli", "rte", DIAGNOSTIC_TASK)
    lines = ["index\tprediction\n"]
    for index, value in zip(idx, predictions, strict=True):
        if task.is_regression:
            text = f"{float(value):.3f}"
        elif as_names:
            text = task.label_names[int(value)]
        else:
            text = str(int(value))
        lines.append(f"{index}\t{text}\n")
    write_text_atomically(path, "".join(lines))


def evaluate_dev_splits(
    trainer: Trainer, task: GlueTask, encoded: dict[str, datasets.Dataset]
) -> dict[str, float]:
    """Metrics of every labeled dev split of the task (MNLI mismatched keys get `_mm`), for eval_results.json."""
    eval_results: dict[str, float] = {}
    for split in task.eval_splits:
        if split not in encoded:
            continue
        metrics = trainer.evaluate(eval_dataset=encoded[split], ignore_keys=NON_PREDICTION_OUTPUTS)
        metrics["eval_samples"] = len(encoded[split])
        if split.endswith("_mismatched"):
            metrics = {key + MISMATCHED_SUFFIX: value for key, value in metrics.items()}
        eval_results.update(metrics)
    trainer.log_metrics("eval", eval_results)
    return eval_results


def save_metrics(out_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    """`<split>_results.json`, and all_results.json merging every split, as transformers' Trainer writes them."""
    write_json_atomically(out_dir / f"{split}_results.json", metrics, indent=4, sort_keys=True)
    all_results = out_dir / "all_results.json"
    merged = json.loads(all_results.read_text()) if all_results.is_file() else {}
    write_json_atomically(all_results, {**merged, **metrics}, indent=4, sort_keys=True)


def predict(
    args: argparse.Namespace,
    trainer: Trainer,
    task: GlueTask,
    raw: dict[str, datasets.Dataset],
    encoded: dict[str, datasets.Dataset],
    tokenizer,
    out_dir: Path,
) -> None:
    """GLUE-server submission files for the task's test splits (MNLI: also AX, when available)."""
    test_sets = [(task, s, raw[s], encoded[s]) for s in task.test_splits if s in encoded]
    if task.name == "mnli":
        diagnostic = load_diagnostic(args)
        if diagnostic is not None:
            diagnostic = limit(diagnostic, args.max_predict_samples)
            ax = TASKS[DIAGNOSTIC_TASK]
            test_sets.append(
                (ax, "test", diagnostic, tokenize(diagnostic, ax, tokenizer, args.max_seq_length))
            )
    for test_task, split, rows, inputs in test_sets:
        output = trainer.predict(inputs.remove_columns("label"), ignore_keys=NON_PREDICTION_OUTPUTS)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        path = out_dir / test_task.submission_files[split]
        predictions = predictions_from_logits(test_task, logits, target_scale(args, test_task))
        write_submission(path, test_task, rows["idx"], predictions)
        logger.info("wrote %s (%d rows)", path.name, len(rows))


# ----------------------------------------------------------------------------------------------------------
# Preemption: stop signals end training with a checkpoint; a rerun resumes from the newest complete one
# ----------------------------------------------------------------------------------------------------------


class StopOnSignal(TrainerCallback):
    """After a SIGTERM/SIGUSR1 (recorded by run_state's StopRequest), save a checkpoint at the end of this
    optimizer step and stop training; run_glue.py then exits with run_state.REQUEUE_EXIT_CODE."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signal is not None:
            logger.warning(
                "stop signal %d: saving a checkpoint at step %d and stopping",
                self.stop.signal,
                state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
        return control


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a file missing or unreadable), or None."""
    missing = [name for name in TRAINER_CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in TRAINER_MODEL_FILES):
        missing.append(" or ".join(TRAINER_MODEL_FILES))
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except ValueError as error:
        return f"trainer_state.json is not valid JSON ({error})"
    step = int(TRAINER_CHECKPOINT.match(checkpoint.name).group(1))
    if state.get("global_step") != step:
        return f"trainer_state.json says step {state.get('global_step')}, the folder name {step}"
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint in `run_dir`; newer incomplete ones (a kill mid-save) are
    renamed `corrupt-checkpoint-N`, so that neither the resume nor the Trainer's rotation takes them."""
    found = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            match = TRAINER_CHECKPOINT.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("%s cannot be resumed from (%s); setting it aside", path, problem)
        path.rename(path.with_name(CORRUPT_PREFIX + path.name))
    return None


def remove_checkpoints(run_dir: Path) -> None:
    """A finished run keeps its results only: its Trainer checkpoints (and any set aside) go."""
    for path in run_dir.iterdir():
        name = path.name.removeprefix(CORRUPT_PREFIX)
        if path.is_dir() and TRAINER_CHECKPOINT.match(name):
            shutil.rmtree(path)
