r"""ELECTRA replaced-token-detection pretraining of dense and Mixture-of-Experts models on WikiText.

A small generator (masked LM) fills in masked tokens with samples; the discriminator labels every token
as original or replaced (Clark et al. 2020). `accelerate` runs it on one CPU, one GPU or many GPUs
(`accelerate launch` / `torchrun`, also under Slurm's `srun`). SIGTERM or SIGUSR1 writes a checkpoint
and exits with status 75 so a job script can requeue; `--resume_from_checkpoint auto` continues exactly.

    python wikitext_trainer.py --model_size small --num_experts 8 --top_k 2 \
        --model_save_directory outputs/pretrain --model_save_name small-moe8-top2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

import distributed
import rtd
from init_checkpoint import check_init_vocabulary
from input_checks import EXIT_BAD_INPUT
from modeling_electra_config import MOE_FIELDS
from optimization import ADAM_BETAS, ADAM_EPSILON, SCHEDULES, make_schedule, optimizer_parameter_groups
from outputs import write_json_atomically
from pretrain_args import check_paths, check_pretraining_flags, default_run_name
from pretrain_data import (
    DATA_STATS_FILE,
    DEFAULT_DATASET_CONFIG,
    DEFAULT_DATASET_NAME,
    DEFAULT_TEXT_COLUMN,
    DEFAULT_TOKENIZER,
    EXAMPLE_FORMATS,
    MAX_PREPROCESSING_WORKERS,
    MAX_SEQ_LENGTH,
    VALIDATION_SPLIT_PERCENTAGE,
    InputError,
    PretrainingData,
    batch_tensors,
    count_steps,
    describe_data_source,
    epoch_batches,
    expand_file_patterns,
    load_tokenizer,
    num_examples,
    prepare_blocks,
)
from pretrain_documents import DOCUMENT_FORMATS
from pretrain_models import build_model_configs, build_models
from provenance import write_provenance
from rtd import DISC_WEIGHT, GEN_WEIGHT, ElectraPretrainingModel, MetricWindow, example_keys
from run_state import (
    REQUEUE_EXIT_CODE,
    StopRequest,
    check_resume_args,
    check_run_dir,
    load_checkpoint,
    log_metrics,
    push_to_hub,
    remove_stale_temporaries,
    reporting_write_errors,
    resume_checkpoint,
    rng_devices,
    save_checkpoint,
    save_final_models,
    save_model_config,
    set_aside_newer_checkpoints,
    start_run_dir,
    stop_requested,
    stop_signal_handlers,
    truncate_metrics,
)
from runlock import is_main_process, run_lock
from score_rtd import check_fixed_eval_set, score_fixed_eval_set
from tracking import REPORT_TO_CHOICES, start_trackers

logger = logging.getLogger("wikitext_trainer")  # a script: __name__ would be "__main__"

# --- Optimisation (ELECTRA paper, Table 6; the learning rate per size: modeling_electra_config.ELECTRA_PRETRAINING)
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 10_000
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 128  # ELECTRA-Small
NUM_EPOCHS = 1

# --- Bookkeeping ----------------------------------------------------------------------------------------------
LOGGING_STEPS = 100
EVAL_STEPS = 1000
SAVE_STEPS = 1000
SAVE_TOTAL_LIMIT = 3
# The modules that log for this script, each under its own name (the log format shows it).
LIBRARY_LOGGERS = ("pretrain_data", "pretrain_models", "run_state", "outputs")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every flag's default."""


# ----------------------------------------------------------------------------------------------------------
# Arguments (their checks: pretrain_args.py)
# ----------------------------------------------------------------------------------------------------------


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its default (an argument table)."""
    from modeling_electra_config import PRESETS, SIZE_FIELDS, add_hyperparameter_flags

    parser = argparse.ArgumentParser(
        prog="wikitext_trainer.py", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATASET_NAME, help="Hugging Face Hub dataset")
    data.add_argument(
        "--dataset_config_name",
        "--dataset_subname",
        dest="dataset_config_name",
        default=DEFAULT_DATASET_CONFIG,
        help="Hub dataset config (--dataset_subname is the original study's name for it)",
    )
    data.add_argument(
        "--train_file",
        nargs="+",
        help="local training files or glob patterns, all text (.txt/.tokens/.raw) or all json/jsonl/csv/parquet",
    )
    data.add_argument(
        "--validation_file",
        nargs="+",
        help="local validation files or patterns; without them a share of --train_file is held out",
    )
    data.add_argument(
        "--document_format",
        choices=DOCUMENT_FORMATS,
        default="auto",
        help="where documents end: wikitext (' = Title = ' headings), rows (each record or line), "
        "blank_lines (BERT/ELECTRA text: blank lines between documents); auto infers it and logs why",
    )
    data.add_argument("--text_column_name", default=DEFAULT_TEXT_COLUMN, help="column holding the text")
    data.add_argument(
        "--validation_split_percentage",
        type=float,
        default=VALIDATION_SPLIT_PERCENTAGE,
        help="%% of training blocks held out when the data has no validation split",
    )
    data.add_argument(
        "--tokenizer_name",
        default=DEFAULT_TOKENIZER,
        help="fast tokenizer: Hub id or local directory (e.g. ../shared/data/electra-vocab)",
    )
    data.add_argument(
        "--train_tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train an uncased WordPiece vocabulary of this size on the training split instead",
    )
    data.add_argument(
        "--max_seq_length", type=int, default=MAX_SEQ_LENGTH, help="tokens per block incl. [CLS]/[SEP]"
    )
    data.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=min(MAX_PREPROCESSING_WORKERS, os.cpu_count() or 1),
        help="processes for tokenization",
    )
    data.add_argument(
        "--example_format",
        choices=EXAMPLE_FORMATS,
        default="electra",
        help="electra: ELECTRA's [CLS] A [SEP] B [SEP] examples within one document, token type ids 0/1, "
        "padded; packed: the original study's [CLS] ... [SEP] blocks cut from the article stream",
    )
    data.add_argument(
        "--data_cache_dir",
        help="where tokenized blocks are cached (default: <model_save_directory>/data_cache)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(PRESETS), default="small", help="ELECTRA size preset")
    add_hyperparameter_flags(model, SIZE_FIELDS + MOE_FIELDS)  # declared in modeling_electra_config.py
    model.add_argument(
        "--generator_size",
        type=float,
        help="generator width / discriminator width (default: from the preset)",
    )
    model.add_argument("--generator_moe", action="store_true", help="give the generator the same MoE layers")
    model.add_argument(
        "--init_discriminator_from",
        metavar="DIR",
        help="continue pretraining from a saved ElectraMoE encoder (a run's discriminator/, or "
        "convert_bert_checkpoint.py's output, dense or upcycled): its config sets the architecture; the "
        "generator is derived from it (fresh weights) unless --init_generator_from",
    )
    model.add_argument(
        "--init_generator_from",
        metavar="DIR",
        help="start the generator from a saved ElectraMoEForMaskedLM (a run's generator/); it still "
        "shares the discriminator's embeddings",
    )

    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--mask_prob",
        type=float,
        help="share of each sequence's real tokens masked (ELECTRA's fixed count per sequence; "
        "default: ELECTRA's for the size, 0.15, 0.25 for large)",
    )
    objective.add_argument(
        "--gen_weight", type=float, default=GEN_WEIGHT, help="weight of the generator MLM loss"
    )
    objective.add_argument("--disc_weight", type=float, default=DISC_WEIGHT, help="weight of the RTD loss")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--learning_rate", type=float, help="peak learning rate (default: ELECTRA's for the size)"
    )
    train.add_argument("--weight_decay", type=float, default=WEIGHT_DECAY)
    train.add_argument("--warmup_steps", type=int, default=WARMUP_STEPS)
    train.add_argument(
        "--lr_schedule",
        choices=SCHEDULES,
        default="electra",
        help="electra: linear decay to 0 over all steps x min(1, step/warmup) (ELECTRA's); "
        "linear: transformers' (decay from the end of warmup)",
    )
    train.add_argument("--max_grad_norm", type=float, default=MAX_GRAD_NORM)
    train.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="blocks per device per micro-batch")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--num_epochs", type=int, default=NUM_EPOCHS)
    train.add_argument("--max_training_steps", type=int, help="optimizer steps; overrides --num_epochs")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--logging_steps", type=int, default=LOGGING_STEPS)
    train.add_argument("--eval_steps", type=int, default=EVAL_STEPS)
    train.add_argument(
        "--max_eval_blocks", type=int, help="evaluate on the first N validation blocks only (default: all)"
    )
    train.add_argument(
        "--fixed_eval_set",
        metavar="NPZ",
        help="also score the discriminator at every evaluation on this score_rtd.py set (fixed_* metrics)",
    )
    train.add_argument("--save_steps", type=int, default=SAVE_STEPS)
    train.add_argument("--save_total_limit", type=int, default=SAVE_TOTAL_LIMIT, help="checkpoints kept")
    train.add_argument(
        "--report_to",
        choices=REPORT_TO_CHOICES,
        default="tensorboard",
        help="experiment tracker (accelerate's); all = every one installed; wandb: pip install wandb, and a "
        "requeued run goes on as the same W&B run",
    )
    train.add_argument(
        "--resume_from_checkpoint",
        metavar="{auto,PATH}",
        help="'auto' = latest checkpoint of this run, if any",
    )
    distributed.add_scaling_arguments(parser)

    output = parser.add_argument_group("output")
    output.add_argument("--model_save_directory", default="outputs/pretrain")
    output.add_argument("--model_save_name", help="run folder name (default: from size and MoE settings)")
    output.add_argument("--overwrite_output_dir", action="store_true", help="replace a finished or stale run")
    output.add_argument("--push_to_hub", action="store_true", help="upload both models when done")
    output.add_argument("--hub_model_id", help="Hub repo for the discriminator (generator: <id>-generator)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (pretrain_args.py); fill the defaults that depend on other flags."""
    from modeling_electra_config import ELECTRA_PRETRAINING

    parser = build_argument_parser()
    args = parser.parse_args(argv)
    check_pretraining_flags(parser, args)
    if args.model_save_name is None:
        args.model_save_name = default_run_name(args)
    if args.data_cache_dir is None:
        args.data_cache_dir = os.path.join(args.model_save_directory, "data_cache")
    args.train_file = expand_file_patterns(args.train_file)
    args.validation_file = expand_file_patterns(args.validation_file)
    for name, value in ELECTRA_PRETRAINING[args.model_size].items():
        if getattr(args, name) is None:  # --learning_rate, --mask_prob: ELECTRA's for the size
            setattr(args, name, value)
    return args


def fail(message: str) -> NoReturn:
    """Stop with a one-line message saying what to fix, exit status 2 like argparse."""
    print(f"wikitext_trainer.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------------------------------------
# Data: the tokenizer, the cached token blocks and the number of steps (pretrain_data.py does the work)
# ----------------------------------------------------------------------------------------------------------


def prepare_inputs(
    args: argparse.Namespace, accelerator: Any, run_dir: Path
) -> tuple[PretrainingData, Any, Any, Any]:
    """Paths, data, model configs and the checkpoint to resume: every input error surfaces here, as an
    InputError (one line and exit status 2, from `main`), before any model is built or anything is written.

    Returns `(data, discriminator_config, generator_config, checkpoint or None)`.
    """
    check_paths(args)
    check_run_dir(args, run_dir)
    source = describe_data_source(args)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(args, source)
        disc_config, gen_config = build_model_configs(args, len(tokenizer), tokenizer.pad_token_id)
        check_init_vocabulary(args, tokenizer, (disc_config, gen_config))
        if args.fixed_eval_set:
            check_fixed_eval_set(args.fixed_eval_set, tokenizer)
        blocks = prepare_blocks(args, tokenizer, source)
    data = count_steps(args, accelerator, tokenizer, blocks)
    checkpoint = resume_checkpoint(args.resume_from_checkpoint, run_dir)
    if checkpoint is not None:
        check_resume_args(run_dir, checkpoint, vars(args), derived_values(accelerator, data))
    if args.warmup_steps >= data.total_steps:
        logger.warning(
            "--warmup_steps %d >= %d training steps: the peak learning rate is never reached",
            args.warmup_steps,
            data.total_steps,
        )
    return data, disc_config, gen_config, checkpoint


# ----------------------------------------------------------------------------------------------------------
# Model: configs, the generator + discriminator objective, AdamW and the schedule
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    model: Any  # the ElectraPretrainingModel, as accelerate prepared it
    optimizer: Any
    scheduler: Any


def build_training_run(
    args: argparse.Namespace,
    tokenizer: Any,
    disc_config: Any,
    gen_config: Any,
    total_steps: int,
    accelerator: Any,
) -> TrainingRun:
    """Generator and discriminator (sharing embeddings) in one RTD module, AdamW with ELECTRA's parameter
    groups and the learning-rate schedule, prepared by `accelerator` (the schedule checkpointed with it)."""
    from accelerate.utils import set_seed

    set_seed(args.seed)
    generator, discriminator = build_models(
        disc_config, gen_config, args.init_discriminator_from, args.init_generator_from
    )
    model = ElectraPretrainingModel(
        generator, discriminator, tokenizer, args.mask_prob, args.gen_weight, args.disc_weight
    )
    model = distributed.prepare_model(model, args, accelerator.device)  # before AdamW takes its parameters
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPSILON,
    )
    scheduler = make_schedule(args.lr_schedule, optimizer, args.warmup_steps, total_steps)
    model, optimizer = distributed.prepare_training(accelerator, model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    set_seed(args.seed, device_specific=True)  # dropout differs per process; masks are keyed per example
    routing = "expert choice" if disc_config.router_type == "expert_choice" else f"top-{disc_config.top_k}"
    logger.info(
        "discriminator %.2fM parameters (%d experts, %s, MoE layers %s); generator %.2fM (hidden %d)",
        discriminator.num_parameters() / 1e6,
        disc_config.num_experts,
        routing,
        disc_config.moe_layer_indices,
        generator.num_parameters() / 1e6,
        gen_config.hidden_size,
    )
    return TrainingRun(model, optimizer, scheduler)


# ----------------------------------------------------------------------------------------------------------
# Loop: one step, evaluation, and the loop with its logging, evaluations and checkpoints
# ----------------------------------------------------------------------------------------------------------


def train_step(
    run: TrainingRun, accelerator: Any, batch: dict[str, torch.Tensor], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One micro-batch: RTD forward and backward; on the last micro-batch of a gradient accumulation, clip
    the gradients and step AdamW and the schedule.

    Returns `(outputs, grad_norm)`, grad_norm None while gradients are still being accumulated.
    """
    with accelerator.accumulate(run.model):
        outputs = run.model(**{name: tensor.to(accelerator.device) for name, tensor in batch.items()})
        accelerator.backward(rtd.data_parallel_loss(outputs, accelerator))
        if not accelerator.sync_gradients:
            return outputs, None
        grad_norm = distributed.clip_grad_norm(accelerator, run.model, max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return outputs, grad_norm


@torch.no_grad()
def evaluate_rtd(
    model: nn.Module, blocks: dict[str, np.ndarray], batch_size: int, accelerator: Any, seed: int
) -> dict[str, Any]:
    """Metrics on this process's share of the validation blocks, with a fixed masking seed.

    The fixed seed makes evaluations comparable across steps and leaves the training RNG untouched.
    """
    module = accelerator.unwrap_model(model)
    module.eval()
    window = MetricWindow()
    with torch.random.fork_rng(devices=rng_devices(accelerator)):
        torch.manual_seed(seed)
        batches = distributed.evaluation_batches(num_examples(blocks), batch_size, accelerator, model)
        for indices, counted in batches:
            batch = batch_tensors(blocks, indices)
            batch["example_keys"] = example_keys(seed, 0, indices, "validation")
            outputs = module(**{name: tensor.to(accelerator.device) for name, tensor in batch.items()})
            if counted:  # under FSDP, a process with fewer examples repeats a batch to stay in step
                window.add(outputs)
    module.train()
    return window.summary(accelerator)


@dataclass
class LoopState:
    global_step: int = 0
    epoch: int = 0
    batch_index: int = 0  # micro-batches of this epoch already taken
    last_eval_step: int = -1
    window: MetricWindow = field(default_factory=MetricWindow)  # statistics since the last train log line
    window_start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds of evaluation and checkpointing in the window (not counted in tokens/s)

    def position(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_index": self.batch_index}


@dataclass
class Pretraining:
    """What the loop and the outputs work with: the flags, accelerate, the run folder, data and training run."""

    args: argparse.Namespace
    accelerator: Any
    run_dir: Path
    data: PretrainingData
    run: TrainingRun


def train(p: Pretraining, stop: StopRequest, checkpoint: Path | None) -> tuple[int, LoopState]:
    """Micro-batches in the seeded order until `total_steps`; returns `(exit status, where it stopped)`."""
    from tqdm.auto import tqdm

    args, accelerator, data, run = p.args, p.accelerator, p.data, p.run

    state = LoopState()
    if checkpoint is not None:
        state = LoopState(**load_checkpoint(accelerator, checkpoint))
    # Read by every process (the last step may have been evaluated before its checkpoint), cut by the main one.
    state.last_eval_step = truncate_metrics(p.run_dir, state.global_step, accelerator.is_main_process)
    start_trackers(accelerator, args.report_to, p.run_dir, args.model_save_name)
    state.window_start = time.perf_counter()
    bar = tqdm(
        total=data.total_steps,
        initial=state.global_step,
        desc="pretraining",
        disable=not accelerator.is_local_main_process,
    )
    run.model.train()
    while state.global_step < data.total_steps:
        batches = epoch_batches(
            num_examples(data.train_blocks),
            args.batch_size,
            state.epoch,
            args.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )[: data.micro_batches_per_epoch]
        for batch_index in range(state.batch_index, len(batches)):
            batch = batch_tensors(data.train_blocks, batches[batch_index])
            batch["example_keys"] = example_keys(args.seed, state.global_step, batches[batch_index])
            outputs, grad_norm = train_step(run, accelerator, batch, args.max_grad_norm)
            state.window.add(outputs)
            if grad_norm is None:
                continue
            state.global_step, state.batch_index = state.global_step + 1, batch_index + 1
            bar.update(1)
            if after_step(p, state, grad_norm, bar, stop):
                bar.close()
                return REQUEUE_EXIT_CODE, state
            if state.global_step >= data.total_steps:
                break
        else:  # the epoch ran to its end (not stopped at total_steps)
            state.epoch, state.batch_index = state.epoch + 1, 0
    bar.close()
    return 0, state


def after_step(
    p: Pretraining, state: LoopState, grad_norm: torch.Tensor, bar: Any, stop: StopRequest
) -> bool:
    """Log, evaluate and checkpoint when the step calls for it; True when a stop signal ends the run here."""
    args, accelerator = p.args, p.accelerator
    step, last = state.global_step, state.global_step == p.data.total_steps
    if step % args.logging_steps == 0 or last:
        seconds = time.perf_counter() - state.window_start - state.paused
        tokens = state.window.tokens * accelerator.num_processes
        metrics = state.window.summary(accelerator)
        metrics.update(
            lr=p.run.scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm),
            tokens_per_second=tokens / max(seconds, 1e-9),
        )
        log_metrics(accelerator, p.run_dir, step, state.epoch, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
        state.window, state.window_start, state.paused = MetricWindow(), time.perf_counter(), 0.0

    pause_start = time.perf_counter()
    if step % args.eval_steps == 0 or last:
        validate(p, state)
    stop_now = stop_requested(stop, accelerator)
    if stop_now or step % args.save_steps == 0:
        save_checkpoint(accelerator, p.run_dir, state.position(), args.save_total_limit)
    state.paused += time.perf_counter() - pause_start
    if stop_now:
        logger.warning(
            "Stop signal received: checkpoint at step %d written, exiting with %d for requeue",
            step,
            REQUEUE_EXIT_CODE,
        )
    return stop_now


def validate(p: Pretraining, state: LoopState) -> None:
    """Evaluate on the validation blocks and log the metrics at the current step."""
    metrics = evaluate_rtd(p.run.model, p.data.valid_blocks, p.args.batch_size, p.accelerator, p.args.seed)
    if p.args.fixed_eval_set:  # the same tokens for every run, whatever its generator (score_rtd.py)
        discriminator = p.accelerator.unwrap_model(p.run.model).discriminator
        metrics |= score_fixed_eval_set(discriminator, p.args.fixed_eval_set, p.args.batch_size)
    log_metrics(p.accelerator, p.run_dir, state.global_step, state.epoch, "validation", metrics)
    state.last_eval_step = state.global_step


# ----------------------------------------------------------------------------------------------------------
# Outputs: discriminator/ (what run_glue.py takes) and generator/, each with the tokenizer
# ----------------------------------------------------------------------------------------------------------


def write_outputs(p: Pretraining, state: LoopState) -> None:
    """A last evaluation (unless the final step had one), then the two models and, if asked, the Hub upload."""
    if state.last_eval_step != state.global_step:
        validate(p, state)
    p.accelerator.wait_for_everyone()
    model = distributed.final_models(p.run.model, p.accelerator)  # under FSDP gathered onto the main process
    if p.accelerator.is_main_process:
        with reporting_write_errors(p.run_dir):
            save_final_models(model, p.data.tokenizer, p.run_dir)
        remove_stale_temporaries(p.run_dir)
        if p.args.push_to_hub:
            push_to_hub(model, p.data.tokenizer, p.args)
    p.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# Main: arguments -> data -> model -> loop -> outputs
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Installed first: a SIGTERM/SIGUSR1 at any point (even during preprocessing) ends in a checkpoint + 75.
    stop = StopRequest()
    run_dir = Path(args.model_save_directory) / args.model_save_name
    # One writer per run folder: under DDP/FSDP only the main process locks.
    lock = (
        run_lock(run_dir, "--model_save_directory", "--model_save_name")
        if is_main_process()
        else nullcontext()
    )
    try:
        with stop_signal_handlers(stop), lock:
            return pretrain(args, stop, sys.argv if argv is None else ["wikitext_trainer.py", *argv])
    except InputError as error:  # bad input or a full disk: one line; any other error keeps its traceback
        fail(str(error))


def pretrain(args: argparse.Namespace, stop: StopRequest, command: list[str] | None = None) -> int:
    """Data -> model -> loop -> outputs; returns the exit status (0, or 75 after a stop signal)."""
    from accelerate import Accelerator

    run_dir = Path(args.model_save_directory) / args.model_save_name
    accelerator = Accelerator(
        # Without an accelerator, say so: accelerate then runs torchrun's processes as CPU DDP (gloo).
        cpu=args.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_dir=str(run_dir),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in (logger.name, *LIBRARY_LOGGERS):  # progress from the main process only
        logging.getLogger(name).setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)

    data, disc_config, gen_config, checkpoint = prepare_inputs(args, accelerator, run_dir)
    accelerator.wait_for_everyone()  # every process has verified its checkpoint before the folder changes
    if accelerator.is_main_process:
        start_run_dir(
            run_dir, args.overwrite_output_dir, dict(vars(args), **derived_values(accelerator, data))
        )
        write_json_atomically(run_dir / DATA_STATS_FILE, data.data_stats)
        if checkpoint is not None and args.resume_from_checkpoint == "auto":
            set_aside_newer_checkpoints(run_dir, checkpoint)
        write_provenance(run_dir, command)
        save_model_config(run_dir, disc_config, data.tokenizer)
    accelerator.wait_for_everyone()
    logger.info(
        "%d train / %d validation blocks of %d tokens; %d optimizer steps (%d per epoch)",
        num_examples(data.train_blocks),
        num_examples(data.valid_blocks),
        args.max_seq_length,
        data.total_steps,
        data.steps_per_epoch,
    )

    run = build_training_run(args, data.tokenizer, disc_config, gen_config, data.total_steps, accelerator)
    p = Pretraining(args, accelerator, run_dir, data, run)
    status, state = train(p, stop, checkpoint)
    if status == 0:
        write_outputs(p, state)
        logger.info("Finished: %s", run_dir)
    accelerator.end_training()
    return status


def derived_values(accelerator: Any, data: PretrainingData) -> dict[str, Any]:
    """What training_args.json records besides the flags: the values that follow from data and processes."""
    return dict(
        vocab_size=len(data.tokenizer),
        total_steps=data.total_steps,
        steps_per_epoch=data.steps_per_epoch,
        num_processes=accelerator.num_processes,
        train_blocks=num_examples(data.train_blocks),
        validation_blocks=num_examples(data.valid_blocks),
    )


if __name__ == "__main__":
    sys.exit(main())
