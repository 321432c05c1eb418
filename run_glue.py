"""Fine-tune and evaluate an ELECTRA or ELECTRA-MoE checkpoint on GLUE with ELECTRA's fine-tuning recipe.

    python run_glue.py --model_name_or_path outputs/pretrain/<run>/discriminator --task_name rte wnli \
        --glue_dir ../shared/data/glue_data --do_train --do_eval --seed 1 2 3

Data comes from the Hub (`nyu-mll/glue`, the default), the original GLUE download (`--glue_dir`) or
csv/tsv/json files; all become the Hub's schema and label ids (see glue_tasks.py). The checkpoint is
loaded through the Auto classes, so its own config decides every MoE setting; only the classification
head may be freshly initialised. Hyper-parameters default to google-research/electra's fine-tuning
recipe (Clark et al. 2020, Appendix A), router losses stay in the training loss (the model adds them).

Each (task, seed) writes `<output_dir>/<model_name>/<task>/seed_<seed>/` atomically: eval_results.json,
train_results.json, all_results.json, run_config.json, config.json, log_history.jsonl and, with
`--do_predict`, GLUE-server submission files (`CoLA.tsv`, `MNLI-m.tsv`, `AX.tsv`, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

import modeling_electra  # noqa: F401  (registers model_type "electra_moe" with the Auto classes)
from glue_tasks import (
    DIAGNOSTIC_TASK,
    GLUE_TASKS,
    MISMATCHED_SUFFIX,
    NO_LABEL,
    RESULTS_FILE,
    TASKS,
    GlueTask,
    SplitData,
    glue_metrics,
    glue_run_dir,
    load_file_split,
    load_glue_dir_split,
)
from input_checks import (
    EXIT_BAD_INPUT,
    InputError,
    check_tokenizer_path,
    check_writable,
    finished_run_model,
    looks_like_local_path,
    unstated_moe_fields,
)
from modeling_electra_config import CLASSIFIER_HEADS, PRESETS, ElectraMoEConfig, config_kwargs
from optimization import SCHEDULES, make_schedule
from outputs import write_atomically, write_json_atomically, write_text_atomically
from runlock import is_main_process, run_lock

logger = logging.getLogger("run_glue")

HUB_DATASET = "nyu-mll/glue"
DEFAULT_OUTPUT_DIR = "outputs/glue"
DEFAULT_SEED = 42
# Results of --random_init go beside the pretrained model's, under <model_name>_random_init.
RANDOM_INIT_SUFFIX = "_random_init"

# ELECTRA fine-tuning hyper-parameters (Clark et al. 2020, Table 7; google-research/electra configure_finetuning.py).
LEARNING_RATE_BY_SIZE = {"small": 3e-4, "base": 1e-4, "large": 5e-5}
LAYERWISE_LR_DECAY_BY_SIZE = {"small": 0.8, "base": 0.8, "large": 0.9}
TRAIN_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
MAX_SEQ_LENGTH = 128
NUM_TRAIN_EPOCHS = 3.0
# RTE and STS-B are small; ELECTRA trains them for 10 epochs.
NUM_TRAIN_EPOCHS_BY_TASK = {"rte": 10.0, "stsb": 10.0}
WARMUP_PROPORTION = 0.1
WEIGHT_DECAY = 0.01
ADAM_EPSILON = 1e-6
LOGGING_STEPS = 50

# Model outputs that are router statistics, not predictions: left out when the Trainer gathers logits.
NON_PREDICTION_OUTPUTS = ["hidden_states", "attentions", *modeling_electra.ROUTER_FIELDS]
ENCODER_LAYER_PATTERN = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
# What to do about a checkpoint folder saved without its tokenizer.
TOKENIZER_FIX_GLUE = (
    "pass --tokenizer_name with the tokenizer it was pretrained with, e.g. ../shared/data/electra-vocab"
)
# Checkpoints whose classification head --classifier_head chooses.
ELECTRA_MODEL_TYPES = ("electra", "electra_moe")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        required=True,
        help="ElectraMoE or ELECTRA checkpoint dir (or a pretraining run dir holding discriminator/), or a Hub id",
    )
    model.add_argument("--tokenizer_name", help="tokenizer dir or Hub id (default: the checkpoint's)")
    model.add_argument(
        "--allow_generator",
        action="store_true",
        help="fine-tune a masked-LM (ELECTRA generator) checkpoint; refused without this flag",
    )
    model.add_argument("--model_name", help="name of the results folder (default: from the checkpoint path)")
    model.add_argument(
        "--random_init",
        action="store_true",
        help="the no-pretraining baseline: the checkpoint's config and tokenizer with freshly initialised weights",
    )
    model.add_argument(
        "--classifier_head",
        choices=CLASSIFIER_HEADS,
        help="ELECTRA checkpoints: electra = ELECTRA's ([CLS] state, dropout 0.1, one dense layer), hf = "
        "transformers' ElectraClassificationHead. Default: a fine-tuned checkpoint's own head, else electra",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task_name",
        required=True,
        nargs="+",
        choices=[*GLUE_TASKS, DIAGNOSTIC_TASK, "all"],
        help="GLUE task(s), 'all' (the nine tasks) or 'ax' alone (diagnostic predictions from an MNLI model)",
    )
    data.add_argument(
        "--glue_dir", type=Path, help="original GLUE download: DIR/<Task>/train.tsv, dev.tsv, ..."
    )
    data.add_argument("--train_file", type=Path, help="csv/tsv/json with Hub or original GLUE column names")
    data.add_argument("--validation_file", type=Path)
    data.add_argument("--test_file", type=Path)
    data.add_argument(
        "--max_seq_length",
        type=int,
        help=f"default {MAX_SEQ_LENGTH}, or the checkpoint's max_position_embeddings if smaller",
    )
    data.add_argument("--max_train_samples", type=int, help="train on a seeded random subset of this size")
    data.add_argument("--max_eval_samples", type=int, help="evaluate on the first N rows of each dev set")
    data.add_argument("--max_predict_samples", type=int, help="predict the first N rows of each test set")
    data.add_argument(
        "--double_unordered",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MRPC and STS-B also train on every pair in swapped order (ELECTRA's double_unordered)",
    )
    data.add_argument(
        "--scale_targets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train STS-B on score / 5, as ELECTRA (predictions are scaled back); --no-scale_targets: on 0-5",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--do_train", action="store_true")
    run.add_argument("--do_eval", action="store_true")
    run.add_argument("--do_predict", action="store_true", help="write GLUE-server submission files")
    run.add_argument("--output_dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR))
    run.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace an existing seed_<seed>/ dir"
    )
    run.add_argument(
        "--save_model", action="store_true", help="keep the fine-tuned model in <run dir>/model/"
    )
    run.add_argument("--seed", type=int, nargs="+", default=[DEFAULT_SEED], help="one run per seed")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (ignored on CPU: fp32 there)")
    run.add_argument("--dataloader_num_workers", type=int, default=0)
    run.add_argument("--logging_steps", type=int, default=LOGGING_STEPS)
    optim = parser.add_argument_group("optimisation (defaults: ELECTRA's fine-tuning recipe)")
    optim.add_argument("--learning_rate", type=float, help="default 3e-4 for small, 1e-4 base, 5e-5 large")
    optim.add_argument("--layerwise_lr_decay", type=float, help="default 0.8 (0.9 large); 1.0 disables")
    optim.add_argument("--num_train_epochs", type=float, help="default 3 (10 for RTE and STS-B)")
    optim.add_argument("--per_device_train_batch_size", type=int, default=TRAIN_BATCH_SIZE)
    optim.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="optimizer step every N batches (effective batch N x per_device_train_batch_size)",
    )
    optim.add_argument("--per_device_eval_batch_size", type=int, default=EVAL_BATCH_SIZE)
    optim.add_argument("--warmup_ratio", type=float, default=WARMUP_PROPORTION)
    optim.add_argument("--weight_decay", type=float, default=WEIGHT_DECAY)
    optim.add_argument(
        "--lr_schedule",
        choices=SCHEDULES,
        default="electra",
        help="electra: linear decay to 0 over all steps times min(1, step / warmup) (ELECTRA's); linear: "
        "transformers' (decay from the end of warmup), what runs before this flag used",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Expand the task list, fill in the default actions and refuse inconsistent flags (exit 2)."""
    args.tasks = list(
        dict.fromkeys(t for name in args.task_name for t in (GLUE_TASKS if name == "all" else [name]))
    )
    diagnostic_only = args.tasks == [DIAGNOSTIC_TASK]
    if DIAGNOSTIC_TASK in args.tasks and not diagnostic_only:
        parser.error(
            "run ax on its own, with an MNLI fine-tuned checkpoint (an mnli run with --do_predict writes AX.tsv)"
        )
    if not (args.do_train or args.do_eval or args.do_predict):
        args.do_train = args.do_eval = not diagnostic_only
        args.do_predict = diagnostic_only
    files = [args.train_file, args.validation_file, args.test_file]
    if args.glue_dir is not None and any(files):
        parser.error("use either --glue_dir or --train_file/--validation_file/--test_file, not both")
    if any(files) and len(args.tasks) > 1:
        parser.error("--train_file/--validation_file/--test_file hold one task; name it with --task_name")
    if diagnostic_only and (args.do_train or args.do_eval):
        parser.error(
            "ax has no train or dev labels: run it with --do_predict on an MNLI fine-tuned checkpoint"
        )
    if diagnostic_only and args.random_init:
        parser.error("--random_init would predict AX with an untrained head")
    if args.glue_dir is not None and not args.glue_dir.is_dir():
        parser.error(f"--glue_dir {args.glue_dir} is not a directory")
    if args.layerwise_lr_decay is not None and not 0 < args.layerwise_lr_decay <= 1:
        parser.error("--layerwise_lr_decay must be in (0, 1]")
    for name in (
        "max_train_samples",
        "max_eval_samples",
        "max_predict_samples",
        "max_seq_length",
        "gradient_accumulation_steps",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")


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
    if args.do_train:
        splits.append(task.train_split)
    if args.do_eval:
        splits += task.eval_splits
    if args.do_predict:
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


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def read_checkpoint_config(name_or_path: str, flag: str) -> dict[str, Any]:
    """config.json of a checkpoint directory or Hub id; a missing one is an InputError naming `flag`."""
    if not Path(name_or_path).exists() and looks_like_local_path(name_or_path):
        raise InputError(f"{flag} {name_or_path}: no such directory; point it at a checkpoint directory")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as error:
        where = "has no config.json" if Path(name_or_path).is_dir() else "is not a local directory"
        reason = str(error).splitlines()[0]
        raise InputError(
            f"{flag} {name_or_path} {where} and could not be loaded ({reason}); point it at a saved model "
            "directory (a pretraining run's discriminator/ or run directory)"
        ) from error
    return config_dict


def refuse_generator(checkpoint: str, config_dict: dict[str, Any], allowed: bool) -> None:
    """A masked-LM checkpoint (ELECTRA's generator) is not what GLUE fine-tunes, unless asked for."""
    masked_lm = [a for a in config_dict.get("architectures") or [] if a.endswith("ForMaskedLM")]
    if not masked_lm or allowed:
        return
    sibling = Path(checkpoint).parent / "discriminator"
    meant = f"--model_name_or_path {sibling}" if sibling.is_dir() else "the run's discriminator/ directory"
    raise InputError(
        f"{checkpoint} is a masked-LM (generator) checkpoint ({masked_lm[0]}); fine-tune the discriminator: "
        f"{meant} (or pass --allow_generator to fine-tune the generator anyway)"
    )


def check_inputs(args: argparse.Namespace) -> None:
    """Checkpoint, tokenizer and output directory, before anything is loaded or written."""
    checkpoint = resolve_checkpoint(args.model_name_or_path)
    config_dict = read_checkpoint_config(checkpoint, "--model_name_or_path")
    refuse_generator(checkpoint, config_dict, args.allow_generator)
    if args.tokenizer_name is not None:
        check_tokenizer_path(args.tokenizer_name)
    else:
        check_tokenizer_path(checkpoint, "--model_name_or_path", TOKENIZER_FIX_GLUE)
    check_writable(Path(args.output_dir), "--output_dir")
    check_run_values(args, config_dict)


def check_run_values(args: argparse.Namespace, config_dict: dict[str, Any]) -> None:
    """Values that would run but mislead: duplicate seeds, a run that trains no step, sequences longer than
    the checkpoint's positions, --bf16 where it has no effect. Fills in the default --max_seq_length."""
    duplicates = sorted({seed for seed in args.seed if args.seed.count(seed) > 1})
    if duplicates:
        raise InputError(f"--seed lists {duplicates} more than once; each (task, seed) cell is one run")
    if args.do_train and args.num_train_epochs is not None and not args.num_train_epochs > 0:
        raise InputError(f"--num_train_epochs {args.num_train_epochs} trains no step; pass a number > 0")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise InputError(f"--learning_rate {args.learning_rate} must be > 0")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} {getattr(args, name)} must be >= 1")
    positions = config_dict.get("max_position_embeddings") or MAX_SEQ_LENGTH
    if args.max_seq_length is None:
        args.max_seq_length = min(MAX_SEQ_LENGTH, positions)
    if args.max_seq_length > positions:
        raise InputError(
            f"--max_seq_length {args.max_seq_length} exceeds the checkpoint's max_position_embeddings "
            f"{positions}; pass --max_seq_length {positions} or less"
        )
    if args.bf16 and not torch.cuda.is_available():
        raise InputError("--bf16 needs a CUDA device (on the CPU runs are fp32); drop --bf16 here")


@contextmanager
def cell_locks(output_dir: Path, model_name: str, runs: list[tuple[str, int]]) -> Iterator[None]:
    """Hold the lock of every (task, seed) cell this call writes (runlock.py); only the main process locks."""
    with ExitStack() as stack:
        if is_main_process():
            for task_name, seed in runs:
                cell = glue_run_dir(output_dir, model_name, task_name, seed)
                stack.enter_context(run_lock(cell, "--output_dir", "--output_dir, --model_name or --seed"))
        yield


def resolve_checkpoint(name_or_path: str) -> str:
    """A pretraining run dir (with discriminator/) resolves to its discriminator; anything else is as given."""
    path = Path(name_or_path)
    model = finished_run_model(path)
    if model is not None and not (path / "config.json").is_file():
        return str(model)
    return name_or_path


def default_model_name(name_or_path: str) -> str:
    """Results folder name: the pretraining run's name for `<run>/discriminator`, the original model's name
    for a model saved by `--save_model` (`<run dir>/model`), else the checkpoint's folder or Hub name."""
    path = Path(name_or_path.rstrip("/"))
    saved_by_us = path.parent / "run_config.json"
    if saved_by_us.is_file():
        return json.loads(saved_by_us.read_text())["model_name"]
    if path.name in ("discriminator", "generator") and path.parent.name:
        # <run>/discriminator is the run's model; a generator (--allow_generator) is filed apart from it.
        return path.parent.name + ("_generator" if path.name == "generator" else "")
    return path.name


def check_moe_config_is_explicit(checkpoint: str) -> dict[str, Any]:
    """An electra_moe config.json must state its MoE settings: a missing field must not fall back to a default.

    Returns the config as saved."""
    config_dict, _ = PretrainedConfig.get_config_dict(checkpoint)
    missing = unstated_moe_fields(config_dict)
    if missing:
        raise ValueError(f"{checkpoint}/config.json has model_type electra_moe but no {missing}; re-save it")
    return config_dict


def model_size_name(config: PretrainedConfig) -> str:
    """The ELECTRA recipe size (small, base, large) a checkpoint is fine-tuned with.

    Its config's `model_size` when ELECTRA has a recipe for it; otherwise the recipe size whose preset
    width is nearest to the preset's width (`tiny` fine-tunes like small) or to the checkpoint's own.
    """
    size = getattr(config, "model_size", None)
    if size in LEARNING_RATE_BY_SIZE:
        return size
    width = PRESETS[size]["hidden_size"] if size in PRESETS else config.hidden_size
    return min(LEARNING_RATE_BY_SIZE, key=lambda name: abs(PRESETS[name]["hidden_size"] - width))


def choose_classifier_head(requested: str | None, config_dict: dict[str, Any]) -> str | None:
    """The head to fine-tune with: `requested`, else the checkpoint's own when it is already a sequence
    classifier (transformers' for an `ElectraForSequenceClassification`), else ELECTRA's. None: the model
    type has no choice (not an ELECTRA checkpoint), its Auto class decides."""
    model_type = config_dict.get("model_type")
    if model_type not in ELECTRA_MODEL_TYPES:
        if requested == "electra":
            raise ValueError(
                f"--classifier_head electra needs an ELECTRA or ElectraMoE checkpoint, not model_type "
                f"{model_type!r}; leave the flag out to use the checkpoint's own head"
            )
        return None
    if requested is not None:
        return requested
    if any(name.endswith("ForSequenceClassification") for name in config_dict.get("architectures") or []):
        return config_dict.get("classifier_head", "hf")
    return "electra"


def classification_config(checkpoint: str, task: GlueTask, head: str | None) -> PretrainedConfig:
    """The checkpoint's config with the task's labels and the classifier head.

    transformers' ELECTRA has only its own head: with ELECTRA's, a plain ELECTRA checkpoint is read into
    the dense ElectraMoE model (the same weights under the same names, the same function).
    """
    label_kwargs: dict[str, Any] = {"num_labels": task.num_labels, "finetuning_task": task.name}
    if task.is_regression:
        label_kwargs["problem_type"] = "regression"
    else:
        label_kwargs["problem_type"] = "single_label_classification"
        label_kwargs["id2label"] = dict(enumerate(task.label_names))
        label_kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    config = AutoConfig.from_pretrained(checkpoint, **label_kwargs)
    if head is None:
        return config
    if config.model_type == "electra" and head == "electra":
        return ElectraMoEConfig(**config_kwargs(config), num_experts=1, classifier_head=head)
    if config.model_type == "electra_moe":
        config.classifier_head = head
    return config


def load_model(
    checkpoint: str,
    task: GlueTask,
    tokenizer_name: str | None,
    random_init: bool = False,
    classifier_head: str | None = None,
) -> tuple[transformers.PreTrainedTokenizerBase, PreTrainedModel]:
    """Load the tokenizer and a sequence-classification model; only the head may be newly initialised.

    With `random_init` every weight is fresh (seeded by the caller): the checkpoint gives only the
    architecture, MoE settings included, so the baseline differs from the pretrained run in weights alone.
    `classifier_head` (ELECTRA checkpoints): see `choose_classifier_head`.
    """
    config_dict = check_moe_config_is_explicit(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or checkpoint)
    head = choose_classifier_head(classifier_head, config_dict)
    config = classification_config(checkpoint, task, head)
    if random_init:
        logger.info(
            "--random_init: %s gives the architecture only; all weights are freshly initialised", checkpoint
        )
        return tokenizer, AutoModelForSequenceClassification.from_config(config)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    body_prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    mismatched = sorted(
        str(entry[0] if isinstance(entry, (tuple, list)) else entry) for entry in info["mismatched_keys"]
    )
    body_missing = [key for key in missing + mismatched if key.startswith(body_prefix)]
    if body_missing:
        raise ValueError(
            f"{checkpoint} has no usable weights for {len(body_missing)} encoder parameters "
            f"(e.g. {body_missing[:4]}): they would be trained from random values. Point "
            "--model_name_or_path at a pretrained discriminator (or its pretraining run directory)."
        )
    new_head = missing + mismatched
    if task.name == DIAGNOSTIC_TASK and new_head:
        raise ValueError(
            f"{checkpoint} has no trained MNLI head ({new_head[:2]} would be random): AX predictions need a "
            "checkpoint fine-tuned on MNLI (run_glue.py --task_name mnli --save_model, then its model/ dir)"
        )
    if new_head:
        logger.info("new classification head: %s", new_head)
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


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


def resolve_hyperparameters(
    args: argparse.Namespace, task_name: str, config: PretrainedConfig
) -> dict[str, Any]:
    size = model_size_name(config)
    return {
        "model_size": size,
        "learning_rate": args.learning_rate
        if args.learning_rate is not None
        else LEARNING_RATE_BY_SIZE[size],
        "layerwise_lr_decay": (
            args.layerwise_lr_decay
            if args.layerwise_lr_decay is not None
            else LAYERWISE_LR_DECAY_BY_SIZE[size]
        ),
        "num_train_epochs": (
            args.num_train_epochs
            if args.num_train_epochs is not None
            else NUM_TRAIN_EPOCHS_BY_TASK.get(task_name, NUM_TRAIN_EPOCHS)
        ),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr_schedule": args.lr_schedule,
        "classifier_head": getattr(config, "classifier_head", None),
        "double_unordered": args.double_unordered and TASKS[task_name].unordered_pair,
        "target_scale": target_scale(args, TASKS[task_name]),
        "max_seq_length": args.max_seq_length or min(MAX_SEQ_LENGTH, config.max_position_embeddings),
        "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay,
        "adam_epsilon": ADAM_EPSILON,
    }


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


def json_default(value: Any) -> Any:
    return str(value)


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


def build_trainer(
    args: argparse.Namespace,
    hyper: dict[str, Any],
    task: GlueTask,
    model: PreTrainedModel,
    tokenizer,
    train_dataset: datasets.Dataset | None,
    output_dir: Path,
    seed: int,
    use_bf16: bool,
) -> LayerwiseDecayTrainer:
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=hyper["per_device_train_batch_size"],
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        learning_rate=hyper["learning_rate"],
        weight_decay=hyper["weight_decay"],
        adam_epsilon=hyper["adam_epsilon"],
        num_train_epochs=hyper["num_train_epochs"],
        warmup_steps=hyper["warmup_ratio"],
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=args.dataloader_num_workers,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    return LayerwiseDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(task, target_scale(args, task)),
        layerwise_lr_decay=hyper["layerwise_lr_decay"],
        lr_schedule=hyper["lr_schedule"],
    )


def evaluate(trainer: Trainer, task: GlueTask, encoded: dict[str, datasets.Dataset]) -> None:
    """Every labeled dev split of the task (MNLI mismatched keys get `_mm`) into eval_results.json."""
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
    save_metrics(Path(trainer.args.output_dir), "eval", eval_results)


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


def write_run_record(out_dir: Path, trainer: Trainer, run_config: dict[str, Any]) -> None:
    """config.json, run_config.json and log_history.jsonl beside the results."""
    trainer.model.config.save_pretrained(out_dir)
    write_json_atomically(out_dir / "run_config.json", run_config, default=json_default)
    history = "".join(json.dumps(record) + "\n" for record in trainer.state.log_history)
    write_text_atomically(out_dir / "log_history.jsonl", history)


def run_task(args: argparse.Namespace, task_name: str, seed: int, model_name: str) -> Path:
    """Fine-tune / evaluate / predict one task with one seed; returns the finished run directory."""
    task = TASKS[task_name]
    run_dir = glue_run_dir(args.output_dir, model_name, task_name, seed)
    if run_dir.exists() and not args.overwrite_output_dir:
        raise FileExistsError(f"{run_dir} exists; pass --overwrite_output_dir or choose another --output_dir")
    set_seed(seed)

    splits, data_summary = load_splits(args, task_name)
    checkpoint = resolve_checkpoint(args.model_name_or_path)
    tokenizer, model = load_model(
        checkpoint, task, args.tokenizer_name, args.random_init, args.classifier_head
    )
    hyper = resolve_hyperparameters(args, task_name, model.config)
    use_bf16 = args.bf16 and torch.cuda.is_available()
    if args.bf16 and not use_bf16:
        logger.warning("--bf16 ignored: no CUDA device (bf16 matmuls are far slower than fp32 on CPU)")
    raw, encoded = encode_splits(args, task, splits, tokenizer, seed)

    def fine_tune_into(tmp_dir: Path) -> None:
        tmp_dir.mkdir()
        trainer = build_trainer(
            args, hyper, task, model, tokenizer, encoded.get("train"), tmp_dir, seed, use_bf16
        )
        if args.do_train:
            train_result = trainer.train()
            if trainer.state.global_step == 0:
                raise ValueError(
                    f"trained no optimizer step ({len(encoded['train'])} examples); nothing kept"
                )
            save_metrics(tmp_dir, "train", dict(train_result.metrics, train_samples=len(encoded["train"])))
        if args.do_eval:
            evaluate(trainer, task, encoded)
        if args.do_predict:
            predict(args, trainer, task, raw, encoded, tokenizer, tmp_dir)
        if args.save_model:
            trainer.save_model(str(tmp_dir / "model"))
        run_config = {
            "task_name": task_name,
            "seed": seed,
            "model_name": model_name,
            "model_name_or_path": args.model_name_or_path,
            "checkpoint": checkpoint,
            "model_class": type(model).__name__,
            "random_init": args.random_init,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "hyperparameters": hyper,
            "bf16": use_bf16,
            "data": data_summary,
            "args": vars(args),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        write_run_record(tmp_dir, trainer, run_config)

    # Written under a temporary name and moved into place whole: a killed run leaves no partial run folder.
    write_atomically(run_dir, fine_tune_into, replace=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """Run; bad input is one line on stderr and exit 2 (nothing written), anything else keeps its traceback."""
    try:
        return run(argv)
    except InputError as error:
        print(f"run_glue.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run(argv: list[str] | None = None) -> int:
    """Every (task, seed) run; a failed run is logged and the others go on (exit 1 if any failed)."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    check_inputs(args)
    model_name = args.model_name or default_model_name(args.model_name_or_path)
    if args.random_init and not args.model_name:
        model_name += RANDOM_INIT_SUFFIX
    runs = [(task, seed) for task in args.tasks for seed in args.seed]

    with cell_locks(args.output_dir, model_name, runs):
        return run_cells(args, model_name, runs)


def run_cells(args: argparse.Namespace, model_name: str, runs: list[tuple[str, int]]) -> int:
    """Each (task, seed) run in turn; returns the exit status (1 if any failed)."""
    failures: list[tuple[str, int, str]] = []
    for task_name, seed in tqdm(runs, desc="GLUE runs", disable=len(runs) == 1):
        try:
            run_dir = run_task(args, task_name, seed, model_name)
        except Exception as error:
            if not isinstance(error, (ValueError, FileNotFoundError, FileExistsError)):
                logger.error("%s", traceback.format_exc())
            logger.error("%s seed %d failed: %s", task_name, seed, error)
            failures.append((task_name, seed, str(error)))
            continue
        results = run_dir / RESULTS_FILE
        if results.is_file():
            scores = {k: round(v, 4) for k, v in json.loads(results.read_text()).items() if "loss" not in k}
            logger.info("%s seed %d: %s -> %s", task_name, seed, scores, run_dir)
        else:
            logger.info("%s seed %d done -> %s", task_name, seed, run_dir)

    if failures:
        logger.error("%d of %d runs failed:", len(failures), len(runs))
        for task_name, seed, message in failures:
            logger.error("  %s seed %d: %s", task_name, seed, message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
