"""Fine-tune and evaluate an ELECTRA or ELECTRA-MoE checkpoint on GLUE with ELECTRA's fine-tuning recipe.

    python run_glue.py --model_name_or_path outputs/pretrain/<run>/discriminator --task_name rte wnli \
        --glue_dir ../shared/data/glue_data --do_train --do_eval --seed 1 2 3

The flags are transformers' `TrainingArguments` (parsed with `HfArgumentParser`, as transformers' own
run_glue example does: --fp16/--bf16, --report_to, --gradient_checkpointing, --torch_compile, --save_steps,
--save_total_limit, --logging_steps, --dataloader_num_workers, ...) plus the model and data flags below. A
flag the user does not set takes ELECTRA's recipe (Clark et al. 2020, Appendix A): learning rate and
layer-wise decay by model size, epochs by task, 10% warmup, weight decay 0.01. `--seed` takes several seeds.

Data comes from the Hub (`nyu-mll/glue`, the default), the original GLUE download (`--glue_dir`) or
csv/tsv/json files; all become the Hub's schema and label ids (see glue_tasks.py). The checkpoint (a model
folder, a pretraining run or one of its `checkpoints/checkpoint-N`, a Hub id; see glue_model.py) is resolved
once; its own config decides every MoE setting; only the classification head may be freshly initialised.

Each (task, seed) runs in `<output_dir>/<model_name>/<task>/seed_<seed>/`: the Trainer's checkpoints go there
(every --save_steps), SIGTERM/SIGUSR1 save one and exit with status 75, and the same command run again
resumes from the newest complete one. A finished run keeps eval_results.json, train_results.json,
all_results.json, run_config.json, config.json, log_history.jsonl, provenance.json and, with `--do_predict`,
GLUE-server submission files (`CoLA.tsv`, `MNLI-m.tsv`, `AX.tsv`, ...); its checkpoints are removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    DataCollatorWithPadding,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from glue_model import GlueCheckpoint, default_model_name, load_model, resolve_glue_checkpoint
from glue_tasks import DIAGNOSTIC_TASK, GLUE_TASKS, RESULTS_FILE, TASKS, GlueTask, glue_run_dir
from glue_training import (
    LayerwiseDecayTrainer,
    StopOnSignal,
    encode_splits,
    evaluate_dev_splits,
    load_splits,
    make_compute_metrics,
    predict,
    remove_checkpoints,
    resumable_checkpoint,
    save_metrics,
    target_scale,
)
from input_checks import EXIT_BAD_INPUT, InputError, check_writable
from modeling_electra_config import CLASSIFIER_HEADS, PRESETS
from optimization import SCHEDULES
from outputs import write_json_atomically, write_text_atomically
from provenance import write_provenance
from run_state import REQUEUE_EXIT_CODE, StopRequest, stop_signal_handlers
from runlock import is_main_process, run_lock
from tracking import wandb_run

logger = logging.getLogger("run_glue")

DEFAULT_OUTPUT_DIR = "outputs/glue"
DEFAULT_SEED = 42
# Results of --random_init go beside the pretrained model's, under <model_name>_random_init.
RANDOM_INIT_SUFFIX = "_random_init"
RUN_CONFIG_FILE = "run_config.json"

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
SAVE_TOTAL_LIMIT = 1
# Flags of earlier versions that TrainingArguments renamed: one line naming the new flag.
RENAMED_FLAGS = {"--warmup_ratio": "--warmup_steps (a value below 1 is a fraction of the training steps)"}


# ----------------------------------------------------------------------------------------------------------
# Arguments: model, data and TrainingArguments (ELECTRA's recipe where the user sets nothing)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "ElectraMoE or ELECTRA model folder, a pretraining run folder (its discriminator/), a "
            "pretraining checkpoint <run>/checkpoints/checkpoint-N, or a Hub id"
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer dir or Hub id (default: the checkpoint's)"}
    )
    allow_generator: bool = field(
        default=False,
        metadata={"help": "fine-tune a masked-LM (ELECTRA generator) checkpoint; refused without this flag"},
    )
    model_name: str | None = field(
        default=None, metadata={"help": "name of the results folder (default: from the checkpoint path)"}
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "the no-pretraining baseline: the checkpoint's config and tokenizer with fresh weights"
        },
    )
    classifier_head: str | None = field(
        default=None,
        metadata={
            "choices": CLASSIFIER_HEADS,
            "help": "ELECTRA checkpoints: electra = ELECTRA's ([CLS] state, dropout 0.1, one dense layer), hf = "
            "transformers' ElectraClassificationHead. Default: a fine-tuned checkpoint's own head, else electra",
        },
    )


@dataclass
class DataArguments:
    task_name: list[str] = field(
        metadata={
            "choices": [*GLUE_TASKS, DIAGNOSTIC_TASK, "all"],
            "help": "GLUE task(s), 'all' (the nine tasks) or 'ax' alone (diagnostic predictions from an MNLI model)",
        }
    )
    glue_dir: Path | None = field(
        default=None, metadata={"help": "original GLUE download: DIR/<Task>/train.tsv, ..."}
    )
    train_file: Path | None = field(
        default=None, metadata={"help": "csv/tsv/json with Hub or GLUE column names"}
    )
    validation_file: Path | None = field(default=None, metadata={"help": "as --train_file, the dev set"})
    test_file: Path | None = field(default=None, metadata={"help": "as --train_file, the test set"})
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": f"tokens per example (truncated); default {MAX_SEQ_LENGTH}, or the checkpoint's "
                  "max_position_embeddings if smaller"},
    )  # fmt: skip
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded random subset"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "evaluate the first N rows of each dev set"}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "predict the first N rows of each test set"}
    )
    double_unordered: bool = field(
        default=True,
        metadata={
            "help": "MRPC and STS-B also train on every pair in swapped order (ELECTRA's double_unordered)"
        },
    )
    scale_targets: bool = field(
        default=True,
        metadata={
            "help": "train STS-B on score / 5, as ELECTRA (predictions are scaled back); --no-scale_targets: 0-5"
        },
    )


@dataclass
class GlueTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with ELECTRA's recipe as defaults; None = chosen per model or task."""

    output_dir: str = field(
        default=DEFAULT_OUTPUT_DIR, metadata={"help": "results: <output_dir>/<model>/<task>/seed_<n>/"}
    )
    seed: list[int] = field(default_factory=lambda: [DEFAULT_SEED], metadata={"help": "one run per seed"})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "peak learning rate; default by model size: 3e-4 small, 1e-4 base, 5e-5 large"},
    )
    layerwise_lr_decay: float | None = field(
        default=None, metadata={"help": "ELECTRA's layer-wise decay; default 0.8 (0.9 large); 1.0 disables"}
    )
    num_train_epochs: float | None = field(
        default=None, metadata={"help": "default 3 (10 for RTE and STS-B)"}
    )
    per_device_train_batch_size: int = field(
        default=TRAIN_BATCH_SIZE, metadata={"help": "batch size per device"}
    )
    per_device_eval_batch_size: int = field(
        default=EVAL_BATCH_SIZE, metadata={"help": "batch size per device"}
    )
    warmup_steps: float = field(
        default=WARMUP_PROPORTION,
        metadata={"help": "warmup steps; a value below 1 is a fraction of all steps"},
    )
    weight_decay: float = field(default=WEIGHT_DECAY, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=ADAM_EPSILON, metadata={"help": "AdamW epsilon"})
    logging_steps: float = field(default=LOGGING_STEPS, metadata={"help": "log every N optimizer steps"})
    save_total_limit: int | None = field(
        default=SAVE_TOTAL_LIMIT,
        metadata={"help": "Trainer checkpoints kept in a run folder (removed once it finishes)"},
    )
    lr_schedule: str = field(
        default="electra",
        metadata={
            "choices": SCHEDULES,
            "help": "electra: linear decay to 0 over all steps times min(1, step / warmup) (ELECTRA's); linear: "
            "transformers' (decay from the end of warmup); overrides --lr_scheduler_type",
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace a finished seed_<seed>/ run"}
    )
    save_model: bool = field(
        default=False, metadata={"help": "keep the fine-tuned model in <run dir>/model/"}
    )

    def __post_init__(self) -> None:
        if not torch.cuda.is_available():
            for flag in ("bf16", "fp16"):  # refused, not recorded for a run that did not use it
                if getattr(self, flag):
                    raise InputError(
                        f"--{flag} needs a CUDA device (on the CPU runs are fp32); drop --{flag} here"
                    )
            self.use_cpu = True
        super().__post_init__()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


class RenamedFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {RENAMED_FLAGS[option_string]}")


def build_argument_parser() -> HfArgumentParser:
    """Every flag of run_glue.py, with its default in --help."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, GlueTrainingArguments),
        prog="run_glue.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    for name in ("double_unordered", "scale_targets"):  # the spelling of earlier versions
        parser.add_argument(f"--no-{name}", dest=name, action="store_false", help=f"= --no_{name}")
    for old, new in RENAMED_FLAGS.items():
        parser.add_argument(old, action=RenamedFlag, default=argparse.SUPPRESS, help=f"renamed: {new}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Model and data flags as attributes, the TrainingArguments as `.training`; bad flags exit 2."""
    parser = build_argument_parser()
    parsed = vars(parser.parse_args(argv))
    model, data = (
        cls(**{f.name: parsed[f.name] for f in fields(cls)}) for cls in (ModelArguments, DataArguments)
    )
    try:
        training = GlueTrainingArguments(
            **{f.name: parsed[f.name] for f in fields(GlueTrainingArguments) if f.init}
        )
    except ValueError as error:  # TrainingArguments' own checks
        parser.error(str(error).splitlines()[0])
    args = argparse.Namespace(**vars(model), **vars(data), training=training)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Expand the task list, fill in the default actions and refuse inconsistent flags (exit 2)."""
    training = args.training
    args.tasks = list(
        dict.fromkeys(t for name in args.task_name for t in (GLUE_TASKS if name == "all" else [name]))
    )
    diagnostic_only = args.tasks == [DIAGNOSTIC_TASK]
    if DIAGNOSTIC_TASK in args.tasks and not diagnostic_only:
        parser.error(
            "run ax on its own, with an MNLI fine-tuned checkpoint (an mnli run with --do_predict writes AX.tsv)"
        )
    if not (training.do_train or training.do_eval or training.do_predict):
        training.do_train = training.do_eval = not diagnostic_only
        training.do_predict = diagnostic_only
    files = [args.train_file, args.validation_file, args.test_file]
    if args.glue_dir is not None and any(files):
        parser.error("use either --glue_dir or --train_file/--validation_file/--test_file, not both")
    if any(files) and len(args.tasks) > 1:
        parser.error("--train_file/--validation_file/--test_file hold one task; name it with --task_name")
    if diagnostic_only and (training.do_train or training.do_eval):
        parser.error(
            "ax has no train or dev labels: run it with --do_predict on an MNLI fine-tuned checkpoint"
        )
    if diagnostic_only and args.random_init:
        parser.error("--random_init would predict AX with an untrained head")
    if args.glue_dir is not None and not args.glue_dir.is_dir():
        parser.error(f"--glue_dir {args.glue_dir} is not a directory")
    if training.layerwise_lr_decay is not None and not 0 < training.layerwise_lr_decay <= 1:
        parser.error("--layerwise_lr_decay must be in (0, 1]")
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples", "max_seq_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if training.gradient_accumulation_steps < 1:
        parser.error("--gradient_accumulation_steps must be >= 1")


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


def first_set(value: Any, default: Any) -> Any:
    return default if value is None else value


def resolve_hyperparameters(
    args: argparse.Namespace, task_name: str, config: PretrainedConfig
) -> dict[str, Any]:
    """The recipe of one (model, task): the flags set, ELECTRA's values for those left unset."""
    size, training = model_size_name(config), args.training
    return {
        "model_size": size,
        "learning_rate": first_set(training.learning_rate, LEARNING_RATE_BY_SIZE[size]),
        "layerwise_lr_decay": first_set(training.layerwise_lr_decay, LAYERWISE_LR_DECAY_BY_SIZE[size]),
        "num_train_epochs": first_set(
            training.num_train_epochs, NUM_TRAIN_EPOCHS_BY_TASK.get(task_name, NUM_TRAIN_EPOCHS)
        ),
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "lr_schedule": training.lr_schedule,
        "classifier_head": getattr(config, "classifier_head", None),
        "double_unordered": args.double_unordered and TASKS[task_name].unordered_pair,
        "target_scale": target_scale(args, TASKS[task_name]),
        "max_seq_length": args.max_seq_length or min(MAX_SEQ_LENGTH, config.max_position_embeddings),
        "warmup_steps": training.warmup_steps,
        "weight_decay": training.weight_decay,
        "adam_epsilon": training.adam_epsilon,
    }


def run_training_arguments(
    args: argparse.Namespace, hyper: dict[str, Any], run_dir: Path, seed: int, run_name: str
) -> TrainingArguments:
    """transformers' TrainingArguments of one (task, seed) run: the parsed flags with the recipe filled in."""
    parsed = args.training
    values = {f.name: getattr(parsed, f.name) for f in fields(TrainingArguments) if f.init}
    values.update(
        output_dir=str(run_dir),
        seed=seed,
        learning_rate=hyper["learning_rate"],
        num_train_epochs=hyper["num_train_epochs"],
        run_name=parsed.run_name or run_name,
    )
    return TrainingArguments(**values)


def build_trainer(
    args: argparse.Namespace,
    hyper: dict[str, Any],
    task: GlueTask,
    model: PreTrainedModel,
    tokenizer,
    train_dataset: datasets.Dataset | None,
    training_args: TrainingArguments,
    stop: StopRequest,
) -> LayerwiseDecayTrainer:
    return LayerwiseDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(task, target_scale(args, task)),
        callbacks=[StopOnSignal(stop)],
        layerwise_lr_decay=hyper["layerwise_lr_decay"],
        lr_schedule=hyper["lr_schedule"],
    )


class Stopped(Exception):
    """A stop signal ended training with a checkpoint: exit REQUEUE_EXIT_CODE, run again to resume."""


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULTS_FILE).is_file() or (run_dir / RUN_CONFIG_FILE).is_file()


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if is_finished(run_dir) and not overwrite:
        raise FileExistsError(
            f"{run_dir} holds a finished run; pass --overwrite_output_dir or choose another --output_dir"
        )


def start_run_dir(run_dir: Path, overwrite: bool, command: list[str]) -> Path | None:
    """Create the run folder, or keep an unfinished one to resume (with `overwrite`: start it afresh, as its
    checkpoints may be another model's); returns the checkpoint to resume from, if any."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_provenance(run_dir, command)
    checkpoint = resumable_checkpoint(run_dir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


def run_task(
    args: argparse.Namespace, checkpoint: GlueCheckpoint, task_name: str, seed: int, model_name: str,
    stop: StopRequest, command: list[str],
) -> Path:  # fmt: skip
    """Fine-tune / evaluate / predict one task with one seed; returns the finished run directory."""
    task, training = TASKS[task_name], args.training
    run_dir = glue_run_dir(Path(training.output_dir), model_name, task_name, seed)
    check_run_dir(run_dir, training.overwrite_output_dir)
    set_seed(seed)
    splits, data_summary = load_splits(args, task_name)
    tokenizer, model = load_model(checkpoint, task, args.random_init, args.classifier_head)
    hyper = resolve_hyperparameters(args, task_name, model.config)
    raw, encoded = encode_splits(args, task, splits, tokenizer, seed)
    resume_from = start_run_dir(run_dir, training.overwrite_output_dir, command)
    run_name = f"{model_name}/{task_name}/seed_{seed}"
    training_args = run_training_arguments(args, hyper, run_dir, seed, run_name)
    trainer = build_trainer(args, hyper, task, model, tokenizer, encoded.get("train"), training_args, stop)
    with wandb_run(run_dir, training_args.report_to, run_name, training_args.process_index == 0):
        if training.do_train:
            train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            if stop.signal is None and trainer.state.global_step == 0:
                raise ValueError(
                    f"trained no optimizer step ({len(encoded['train'])} examples); nothing kept"
                )
            if stop.signal is not None:
                raise Stopped(
                    f"{run_dir}: stopped by signal {stop.signal} at step {trainer.state.global_step}"
                )
            save_metrics(run_dir, "train", dict(train_result.metrics, train_samples=len(encoded["train"])))
        eval_results = evaluate_dev_splits(trainer, task, encoded) if training.do_eval else None
        if training.do_predict:
            predict(args, trainer, task, raw, encoded, tokenizer, run_dir)
    if training.save_model:
        trainer.save_model(str(run_dir / "model"))
    run_config = {
        "task_name": task_name,
        "seed": seed,
        "model_name": model_name,
        "model_name_or_path": args.model_name_or_path,
        "checkpoint": checkpoint.path,
        "checkpoint_record": checkpoint.describe(),
        "pretraining_step": checkpoint.pretraining_step,
        "pretraining_flops": checkpoint.pretraining_flops,
        "model_class": type(model).__name__,
        "random_init": args.random_init,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "hyperparameters": hyper,
        "bf16": training_args.bf16,
        "fp16": training_args.fp16,
        "data": data_summary,
        "args": {**vars(args), "training": training_args.to_dict()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_results(run_dir, trainer, eval_results, run_config)
    return run_dir


def write_results(
    run_dir: Path, trainer: Trainer, eval_results: dict[str, float] | None, run_config: dict[str, Any]
) -> None:
    """config.json, log_history.jsonl, eval_results.json, then run_config.json (the run is finished once it
    is there), and the checkpoints go."""
    trainer.model.config.save_pretrained(run_dir)
    history = "".join(json.dumps(record) + "\n" for record in trainer.state.log_history)
    write_text_atomically(run_dir / "log_history.jsonl", history)
    if eval_results is not None:
        save_metrics(run_dir, "eval", eval_results)
    write_json_atomically(run_dir / RUN_CONFIG_FILE, run_config, default=str)
    remove_checkpoints(run_dir)


def main(argv: list[str] | None = None) -> int:
    """Run; bad input is one line on stderr and exit 2 (nothing written), a stop signal exit 75 (run again to
    resume), anything else keeps its traceback."""
    command = sys.argv if argv is None else ["run_glue.py", *argv]
    stop = StopRequest()
    try:
        with stop_signal_handlers(stop), tempfile.TemporaryDirectory(prefix="run_glue-") as workdir:
            return run(argv, stop, command, Path(workdir))
    except InputError as error:
        print(f"run_glue.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def check_inputs(args: argparse.Namespace, workdir: Path) -> GlueCheckpoint:
    """Checkpoint (resolved once, here), tokenizer and output directory, before anything is written."""
    checkpoint = resolve_glue_checkpoint(
        args.model_name_or_path, args.tokenizer_name, args.allow_generator, workdir
    )
    check_writable(Path(args.training.output_dir), "--output_dir")
    check_run_values(args, checkpoint.config)
    return checkpoint


def check_run_values(args: argparse.Namespace, config_dict: dict[str, Any]) -> None:
    """Values that would run but mislead: duplicate seeds, a run that trains no step, sequences longer than
    the checkpoint's positions. Fills in the default --max_seq_length."""
    training = args.training
    duplicates = sorted({seed for seed in training.seed if training.seed.count(seed) > 1})
    if duplicates:
        raise InputError(f"--seed lists {duplicates} more than once; each (task, seed) cell is one run")
    if training.do_train and training.num_train_epochs is not None and not training.num_train_epochs > 0:
        raise InputError(
            f"--num_train_epochs {training.num_train_epochs:g} trains no step; pass a number > 0"
        )
    if training.learning_rate is not None and not training.learning_rate > 0:
        raise InputError(f"--learning_rate {training.learning_rate} must be > 0")
    positions = config_dict.get("max_position_embeddings") or MAX_SEQ_LENGTH
    if args.max_seq_length is None:
        args.max_seq_length = min(MAX_SEQ_LENGTH, positions)
    if args.max_seq_length > positions:
        raise InputError(
            f"--max_seq_length {args.max_seq_length} exceeds the checkpoint's max_position_embeddings "
            f"{positions}; pass --max_seq_length {positions} or less"
        )


@contextmanager
def cell_locks(output_dir: Path, model_name: str, runs: list[tuple[str, int]]) -> Iterator[None]:
    """Hold the lock of every (task, seed) cell this call writes (runlock.py); only the main process locks."""
    with ExitStack() as stack:
        if is_main_process():
            for task_name, seed in runs:
                cell = glue_run_dir(output_dir, model_name, task_name, seed)
                stack.enter_context(run_lock(cell, "--output_dir", "--output_dir, --model_name or --seed"))
        yield


def run(argv: list[str] | None, stop: StopRequest, command: list[str], workdir: Path) -> int:
    """Every (task, seed) run; a failed run is logged and the others go on (exit 1 if any failed)."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    checkpoint = check_inputs(args, workdir)
    model_name = args.model_name or default_model_name(args.model_name_or_path)
    if args.random_init and not args.model_name:
        model_name += RANDOM_INIT_SUFFIX
    runs = [(task, seed) for task in args.tasks for seed in args.training.seed]
    with cell_locks(Path(args.training.output_dir), model_name, runs):
        return run_cells(args, checkpoint, model_name, runs, stop, command)


def run_cells(
    args: argparse.Namespace, checkpoint: GlueCheckpoint, model_name: str, runs: list[tuple[str, int]],
    stop: StopRequest, command: list[str],
) -> int:  # fmt: skip
    """Each (task, seed) run in turn; returns the exit status (1 if any failed, 75 if stopped)."""
    failures: list[tuple[str, int, str]] = []
    for task_name, seed in tqdm(runs, desc="GLUE runs", disable=len(runs) == 1):
        try:
            run_dir = run_task(args, checkpoint, task_name, seed, model_name, stop, command)
        except Stopped as stopped:
            logger.warning("%s; run the same command again to resume (exit %d)", stopped, REQUEUE_EXIT_CODE)
            return REQUEUE_EXIT_CODE
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
