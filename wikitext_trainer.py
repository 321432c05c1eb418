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
import codecs
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from input_checks import TOKENIZER_FIX, check_tokenizer_path, check_writable
from optimization import SCHEDULES, make_schedule
from outputs import write_atomically
from pretrain_data import (
    DEFAULT_DATASET_CONFIG,
    DEFAULT_DATASET_NAME,
    DEFAULT_TEXT_COLUMN,
    DEFAULT_TOKENIZER,
    EXAMPLE_FORMATS,
    MAX_PREPROCESSING_WORKERS,
    MAX_SEQ_LENGTH,
    VALIDATION_SPLIT_PERCENTAGE,
    WORDPIECE_SPECIAL_TOKENS,
    InputError,
    batch_tensors,
    describe_data_source,
    epoch_batches,
    load_tokenizer,
    num_examples,
    prepare_blocks,
)
from provenance import write_provenance
from rtd import DISC_WEIGHT, GEN_WEIGHT, MASK_PROB, ElectraPretrainingModel, MetricWindow
from run_state import (
    REQUEUE_EXIT_CODE,
    StopRequest,
    check_resume_args,
    check_run_dir,
    load_checkpoint,
    log_metrics,
    remove_stale_temporaries,
    reporting_write_errors,
    resolve_checkpoint,
    rng_devices,
    save_checkpoint,
    save_model_config,
    set_aside_newer_checkpoints,
    start_run_dir,
    stop_requested,
    stop_signal_handlers,
    truncate_metrics,
)
from tracking import REPORT_TO_CHOICES, start_trackers

logger = logging.getLogger("wikitext_trainer")

# --- Optimisation (ELECTRA paper, Table 6) ------------------------------------------------------------------
LEARNING_RATE_BY_PRESET = {"tiny": 5e-4, "small": 5e-4, "base": 2e-4}
WEIGHT_DECAY = 0.01
NO_DECAY_KEYS = ("LayerNorm", "layer_norm", "bias")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-6
WARMUP_STEPS = 10_000
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 128  # ELECTRA-Small
NUM_EPOCHS = 1

# --- Bookkeeping ----------------------------------------------------------------------------------------------
LOGGING_STEPS = 100
EVAL_STEPS = 1000
SAVE_STEPS = 1000
SAVE_TOTAL_LIMIT = 3
USAGE_ERROR_EXIT_CODE = 2  # what argparse uses for bad command lines
UTF8_SNIFF_BYTES = 1 << 16  # the start of a data file that must decode as UTF-8
SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "embedding_size",
)
# With --init_discriminator_from the architecture is the checkpoint's: these flags would contradict it.
CHECKPOINT_ARCHITECTURE_FIELDS = (
    *SIZE_FIELDS,
    "num_experts",
    "top_k",
    "moe_layers",
    "moe_layer_frequency",
    "expert_intermediate_size",
    "router_type",
    "norm_topk_prob",
)
# ... while these training-time router settings come from the flags, as in a fresh run.
TRAINING_ROUTER_FIELDS = (
    "capacity_factor",
    "expert_choice_scope",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "moe_implementation",
)
MOE_FIELDS = (
    "num_experts",
    "top_k",
    "moe_layers",
    "moe_layer_frequency",
    "expert_intermediate_size",
    "capacity_factor",
    "router_type",
    "expert_choice_scope",
    "norm_topk_prob",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "moe_implementation",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every flag's default."""


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its default (an argument table)."""
    from modeling_electra_config import (
        EXPERT_CHOICE_SCOPES,
        MOE_IMPLEMENTATIONS,
        PRESETS,
        ROUTER_TYPES,
        ST_MOE_Z_LOSS_COEF,
        SWITCH_AUX_LOSS_COEF,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
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
        "--train_file", help="local training text (WikiText layout, .txt/.tokens/.raw; or json/csv)"
    )
    data.add_argument(
        "--validation_file", help="local validation text; without it a share of --train_file is held out"
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
    for name in SIZE_FIELDS:
        model.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    model.add_argument("--num_experts", type=int, default=1, help="experts per MoE layer (1 = dense ELECTRA)")
    model.add_argument("--top_k", type=int, default=2, help="experts per token")
    model.add_argument(
        "--moe_layers", type=int, nargs="+", help="encoder layers with an MoE block (default: all)"
    )
    model.add_argument("--moe_layer_frequency", type=int, default=1, help="every n-th layer is MoE")
    model.add_argument(
        "--expert_intermediate_size", type=int, help="expert FFN width (default: intermediate_size)"
    )
    model.add_argument("--capacity_factor", type=float, help="expert capacity factor (default: dropless)")
    model.add_argument("--router_type", choices=ROUTER_TYPES, default="softmax_topk")
    model.add_argument(
        "--expert_choice_scope",
        choices=EXPERT_CHOICE_SCOPES,
        default="sequence",
        help="expert_choice router: experts pick tokens within each sequence or within the whole batch",
    )
    model.add_argument("--norm_topk_prob", action="store_true", help="renormalise the top-k gate weights")
    model.add_argument("--router_jitter_noise", type=float, default=0.0)
    model.add_argument("--router_aux_loss_coef", type=float, default=SWITCH_AUX_LOSS_COEF)
    model.add_argument("--router_z_loss_coef", type=float, default=ST_MOE_Z_LOSS_COEF)
    model.add_argument("--moe_implementation", choices=MOE_IMPLEMENTATIONS, default="auto")
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
        default=MASK_PROB,
        help="share of each sequence's real tokens masked (ELECTRA's fixed count per sequence)",
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

    output = parser.add_argument_group("output")
    output.add_argument("--model_save_directory", default="outputs/pretrain")
    output.add_argument("--model_save_name", help="run folder name (default: from size and MoE settings)")
    output.add_argument("--overwrite_output_dir", action="store_true", help="replace a finished or stale run")
    output.add_argument("--push_to_hub", action="store_true", help="upload both models when done")
    output.add_argument("--hub_model_id", help="Hub repo for the discriminator (generator: <id>-generator)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; fill the defaults that depend on other flags."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    positive = ["max_seq_length", "batch_size", "gradient_accumulation_steps", "num_epochs", "logging_steps"]
    positive += ["eval_steps", "save_steps", "save_total_limit", "preprocessing_num_workers"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_training_steps", "max_eval_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 0 < args.mask_prob < 1:
        parser.error(f"--mask_prob must lie in (0, 1), got {args.mask_prob}")
    if args.warmup_steps < 0 or args.weight_decay < 0 or args.max_grad_norm <= 0:
        parser.error("--warmup_steps and --weight_decay must be >= 0, --max_grad_norm > 0")
    if args.train_tokenizer is not None and args.train_tokenizer < len(WORDPIECE_SPECIAL_TOKENS) + 1:
        parser.error("--train_tokenizer needs a vocabulary size larger than the special tokens")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error(
            "--overwrite_output_dir starts over; it cannot be combined with --resume_from_checkpoint"
        )
    if args.validation_file and not args.train_file:
        parser.error("--validation_file needs --train_file")
    if not 0 < args.validation_split_percentage < 100:
        parser.error("--validation_split_percentage must lie in (0, 100)")
    if args.max_seq_length < 3:
        parser.error("--max_seq_length must leave room for [CLS], a token and [SEP]")
    problem = init_flags_error(parser, args) or model_shape_error(args)
    if problem:
        parser.error(problem)
    if args.model_save_name is None:
        args.model_save_name = default_run_name(args)
    if args.data_cache_dir is None:
        args.data_cache_dir = os.path.join(args.model_save_directory, "data_cache")
    if args.learning_rate is None:
        args.learning_rate = LEARNING_RATE_BY_PRESET[args.model_size]
    return args


def default_run_name(args: argparse.Namespace) -> str:
    """`electra-small` for the dense baseline, `electra-small-moe8-top2` for an MoE model,
    `electra-small-moe8-ec` with expert-choice routing (which ignores top_k); `<DIR name>-continued` when
    continuing from --init_discriminator_from DIR."""
    if args.init_discriminator_from:
        return f"{Path(args.init_discriminator_from).resolve().name}-continued"
    name = f"electra-{args.model_size}"
    if args.num_experts == 1:
        return name
    routing = "ec" if args.router_type == "expert_choice" else f"top{args.top_k}"
    return f"{name}-moe{args.num_experts}-{routing}"


def fail(message: str) -> NoReturn:
    """Stop with a one-line message saying what to fix, exit status 2 like argparse."""
    print(f"wikitext_trainer.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR_EXIT_CODE)


def model_shape_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the model the size flags describe (None if nothing), found before anything runs."""
    from modeling_electra_config import PRESETS

    sizes = {name: getattr(args, name) for name in SIZE_FIELDS}
    sizes = {name: PRESETS[args.model_size][name] if v is None else v for name, v in sizes.items()}
    too_small = [f"--{name} {value}" for name, value in sizes.items() if value < 1]
    if too_small:
        return f"{', '.join(too_small)}: model sizes must be >= 1"
    if sizes["hidden_size"] % sizes["num_attention_heads"] and not args.init_discriminator_from:
        return (
            f"--hidden_size {sizes['hidden_size']} is not a multiple of --num_attention_heads "
            f"{sizes['num_attention_heads']}: each attention head takes an equal share of the hidden size"
        )
    try:  # every other config check (MoE fields, generator size, sequence length), with a stand-in vocabulary
        build_model_configs(args, len(WORDPIECE_SPECIAL_TOKENS) + 1)
    except InputError as error:
        return str(error)
    return None


def check_paths(args: argparse.Namespace) -> None:
    """Output folders writable, tokenizer and text files readable: each problem named by its flag."""
    check_writable(Path(args.model_save_directory), "--model_save_directory")
    check_writable(Path(args.data_cache_dir), "--data_cache_dir")
    if args.train_tokenizer is None:
        check_tokenizer_path(args.tokenizer_name, fix=f"{TOKENIZER_FIX}, or --train_tokenizer")
    for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if path is not None and Path(path).suffix.lower() != ".parquet" and os.path.isfile(path):
            check_utf8(Path(path), flag)


def check_utf8(path: Path, flag: str) -> None:
    """The start of a text/json/csv file must decode as UTF-8 (a binary file fails here, by name)."""
    with open(path, "rb") as handle:
        head = handle.read(UTF8_SNIFF_BYTES)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{flag} {path} is not UTF-8 text (byte {head[error.start]:#04x} at offset {error.start}); "
            "pass a text file (WikiText layout) or json/csv/parquet"
        ) from error


# ----------------------------------------------------------------------------------------------------------
# Data: the tokenizer, the cached token blocks and the number of steps (pretrain_data.py does the work)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PretrainingData:
    tokenizer: Any
    train_blocks: dict[str, np.ndarray]  # input_ids (and token_type_ids), [examples, max_seq_length]
    valid_blocks: dict[str, np.ndarray]
    steps_per_epoch: int
    micro_batches_per_epoch: int  # per process
    total_steps: int


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
        blocks = prepare_blocks(args, tokenizer, source)
    data = count_steps(args, accelerator, tokenizer, blocks)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run_dir)
    if checkpoint is not None:
        check_resume_args(run_dir, checkpoint, vars(args), derived_values(accelerator, data))
    if args.warmup_steps >= data.total_steps:
        logger.warning(
            "--warmup_steps %d >= %d training steps: the peak learning rate is never reached",
            args.warmup_steps,
            data.total_steps,
        )
    return data, disc_config, gen_config, checkpoint


def count_steps(args: argparse.Namespace, accelerator: Any, tokenizer: Any, blocks: dict) -> PretrainingData:
    """Optimizer steps per epoch and in all, from the blocks, the batch size and the number of processes."""
    train_blocks = blocks["train"]
    valid_blocks = {name: array[: args.max_eval_blocks] for name, array in blocks["validation"].items()}
    num_train, num_valid = num_examples(train_blocks), num_examples(valid_blocks)
    processes = accelerator.num_processes
    micro_batches = len(epoch_batches(num_train, args.batch_size, 0, args.seed, 0, processes))
    steps_per_epoch = micro_batches // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise InputError(
            f"{num_train} training blocks are fewer than one optimizer step needs "
            f"(--batch_size {args.batch_size} x --gradient_accumulation_steps {args.gradient_accumulation_steps} "
            f"x {processes} processes)"
        )
    if num_valid < processes:
        raise InputError(f"{num_valid} validation blocks cannot be shared by {processes} processes")
    return PretrainingData(
        tokenizer=tokenizer,
        train_blocks=train_blocks,
        valid_blocks=valid_blocks,
        steps_per_epoch=steps_per_epoch,
        micro_batches_per_epoch=steps_per_epoch * args.gradient_accumulation_steps,
        total_steps=args.max_training_steps or args.num_epochs * steps_per_epoch,
    )


# ----------------------------------------------------------------------------------------------------------
# Model: configs, the generator + discriminator objective, AdamW and the schedule
# ----------------------------------------------------------------------------------------------------------


def build_model_configs(
    args: argparse.Namespace, tokenizer_size: int, pad_token_id: int = 0
) -> tuple[Any, Any]:
    """Discriminator config from the size preset plus flags (or from --init_discriminator_from's config), and
    the generator config derived from it by ELECTRA's size rule (or --init_generator_from's)."""
    from modeling_electra_config import ElectraMoEConfig, make_generator_config

    sizes = {name: getattr(args, name) for name in SIZE_FIELDS if getattr(args, name) is not None}
    moe = {name: getattr(args, name) for name in MOE_FIELDS}
    try:
        if args.init_discriminator_from:
            disc = load_init_config(args.init_discriminator_from, "--init_discriminator_from", args)
        else:
            disc = ElectraMoEConfig.from_preset(
                args.model_size, vocab_size=tokenizer_size, pad_token_id=pad_token_id, **sizes, **moe
            )
        if args.max_seq_length > disc.max_position_embeddings:
            raise ValueError(
                f"max_seq_length must be <= max_position_embeddings ({disc.max_position_embeddings})"
            )
        if args.init_generator_from:
            gen = load_init_config(args.init_generator_from, "--init_generator_from", args)
            shared = ("embedding_size", "vocab_size", "max_position_embeddings", "type_vocab_size")
            different = [f"{key} {getattr(gen, key)} vs {getattr(disc, key)}" for key in shared
                         if getattr(gen, key) != getattr(disc, key)]  # fmt: skip
            if different:
                raise ValueError(
                    f"--init_generator_from {args.init_generator_from} cannot share the discriminator's "
                    f"embeddings: {', '.join(different)}"
                )
        else:
            gen = make_generator_config(
                disc, generator_size=args.generator_size, generator_moe=args.generator_moe
            )
    except ValueError as error:
        raise InputError(str(error)) from error
    return disc, gen


def build_models(
    disc_config: Any,
    gen_config: Any,
    init_discriminator_from: str | None = None,
    init_generator_from: str | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator: fresh, or with the weights saved in the --init_* folders (fp32)."""
    from modeling_electra import ElectraMoEForMaskedLM, ElectraMoEForPreTraining

    models = []
    for cls, config, path in (
        (ElectraMoEForMaskedLM, gen_config, init_generator_from),
        (ElectraMoEForPreTraining, disc_config, init_discriminator_from),
    ):
        if path is None:
            models.append(cls(config))
            continue
        model, info = cls.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True)
        logger.info("%s from %s; newly initialised: %s", cls.__name__, path, info["missing_keys"] or "none")
        models.append(model)
    return models[0], models[1]


# --- Continued pretraining: --init_discriminator_from / --init_generator_from ----------------------------------


def init_flags_error(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Flags that contradict a checkpoint's architecture, or an --init_generator_from without a discriminator."""
    if args.init_generator_from and not args.init_discriminator_from:
        return "--init_generator_from needs --init_discriminator_from (the generator shares its embeddings)"
    if not args.init_discriminator_from:
        return None
    fields = list(CHECKPOINT_ARCHITECTURE_FIELDS)
    if args.init_generator_from:
        fields += ["generator_size", "generator_moe"]
    given = [f"--{name}" for name in fields if getattr(args, name) != parser.get_default(name)]
    if given:
        return (
            f"{', '.join(given)} cannot be combined with --init_discriminator_from: the architecture comes "
            "from the checkpoint's config.json"
        )
    return None


def load_init_config(path: str, flag: str, args: argparse.Namespace) -> Any:
    """The ElectraMoE config saved in `path`, with this run's training-time router settings."""
    from modeling_electra_config import ElectraMoEConfig, preset_name

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InputError(
            f"{flag} {path} holds no config.json: pass a folder written by save_pretrained (a pretraining "
            "run's discriminator/ or generator/, or convert_bert_checkpoint.py's output)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
        config = ElectraMoEConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {path}: could not read its config.json ({error})") from error
    if model_type != ElectraMoEConfig.model_type:
        raise InputError(
            f"{flag} {path} holds a '{model_type}' model, not an ElectraMoE one; convert a BERT checkpoint "
            "with convert_bert_checkpoint.py first"
        )
    # Rebuilt, not patched attribute by attribute, so the config's defaults and checks apply to the new
    # settings (an expert-choice router keeps its capacity factor of 2 when --capacity_factor is not given).
    settings = dict(config.to_dict(), **{name: getattr(args, name) for name in TRAINING_ROUTER_FIELDS})
    try:
        config = ElectraMoEConfig.from_dict(settings)
    except ValueError as error:
        raise InputError(f"{flag} {path}: {error}") from error
    if config.model_size is None:  # e.g. a converted BERT: name its size if it is a preset's
        config.model_size = preset_name(config.hidden_size, config.num_hidden_layers)
    return config


def check_init_vocabulary(args: argparse.Namespace, tokenizer: Any, configs: tuple[Any, Any]) -> None:
    """A checkpoint's vocabulary must be the tokenizer's: same size, and the same tokens if it saved its own."""
    from transformers import AutoTokenizer

    for flag, path, config in (
        ("--init_discriminator_from", args.init_discriminator_from, configs[0]),
        ("--init_generator_from", args.init_generator_from, configs[1]),
    ):
        if path is None:
            continue
        fix = f"pass --tokenizer_name {path} (the checkpoint's own tokenizer)"
        if config.vocab_size != len(tokenizer):
            raise InputError(
                f"{flag} {path} has a vocabulary of {config.vocab_size} tokens, the tokenizer "
                f"{len(tokenizer)}: {fix}"
            )
        has_tokenizer = any((Path(path) / name).is_file() for name in ("vocab.txt", "tokenizer.json"))
        if has_tokenizer and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise InputError(
                f"{flag} {path} saved a tokenizer whose vocabulary differs from this run's: {fix}"
            )
        check_init_weights(flag, path, config)


def check_init_weights(flag: str, path: str, config: Any) -> None:
    """Every encoder weight of the config must be in the folder's safetensors (a run's or a converted model)."""
    from safetensors import safe_open

    from modeling_electra import ElectraMoEModel

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise InputError(f"{flag} {path} holds no *.safetensors weights (save_pretrained writes them)")
    saved = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            saved |= {key.removeprefix("electra.") for key in handle.keys()}  # noqa: SIM118 (not iterable)
    with torch.device("meta"):
        expected = set(ElectraMoEModel(config).state_dict())
    missing = sorted(key for key in expected - saved if not key.endswith("position_ids"))
    if missing:
        raise InputError(
            f"{flag} {path} lacks {len(missing)} encoder weights its config.json describes (e.g. {missing[:3]})"
        )


def optimizer_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay everywhere except biases and LayerNorm (ELECTRA's exclusion list)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY_KEYS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPSILON,
    )
    scheduler = make_schedule(args.lr_schedule, optimizer, args.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    set_seed(args.seed, device_specific=True)  # different masks on each process
    logger.info(
        "discriminator %.2fM parameters (%d experts, top-%d, MoE layers %s); generator %.2fM (hidden %d)",
        discriminator.num_parameters() / 1e6,
        disc_config.num_experts,
        disc_config.top_k,
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
        accelerator.backward(outputs["loss"])
        if not accelerator.sync_gradients:
            return outputs, None
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return outputs, grad_norm


@torch.no_grad()
def evaluate(
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
        shard = np.arange(accelerator.process_index, num_examples(blocks), accelerator.num_processes)
        for start in range(0, len(shard), batch_size):
            batch = batch_tensors(blocks, shard[start : start + batch_size])
            window.add(module(**{name: tensor.to(accelerator.device) for name, tensor in batch.items()}))
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
    metrics = evaluate(p.run.model, p.data.valid_blocks, p.args.batch_size, p.accelerator, p.args.seed)
    log_metrics(p.accelerator, p.run_dir, state.global_step, state.epoch, "validation", metrics)
    state.last_eval_step = state.global_step


# ----------------------------------------------------------------------------------------------------------
# Outputs: discriminator/ (what run_glue.py takes) and generator/, each with the tokenizer
# ----------------------------------------------------------------------------------------------------------


def save_final_models(model: ElectraPretrainingModel, tokenizer: Any, run_dir: Path) -> None:
    """Write generator/ and discriminator/ (last, it marks the run finished) via temp dirs and renames."""
    for name in ("generator", "discriminator"):
        save = partial(save_pretrained_with_tokenizer, getattr(model, name), tokenizer)
        write_atomically(run_dir / name, save, replace=True)


def save_pretrained_with_tokenizer(part: nn.Module, tokenizer: Any, directory: Path) -> None:
    part.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def push_to_hub(model: ElectraPretrainingModel, tokenizer: Any, args: argparse.Namespace) -> None:
    repo = args.hub_model_id or args.model_save_name
    for part, repo_id in ((model.discriminator, repo), (model.generator, f"{repo}-generator")):
        part.push_to_hub(repo_id)
        tokenizer.push_to_hub(repo_id)


def write_outputs(p: Pretraining, state: LoopState) -> None:
    """A last evaluation (unless the final step had one), then the two models and, if asked, the Hub upload."""
    if state.last_eval_step != state.global_step:
        validate(p, state)
    p.accelerator.wait_for_everyone()
    if p.accelerator.is_main_process:
        model = p.accelerator.unwrap_model(p.run.model)
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
    try:
        with stop_signal_handlers(stop):
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
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)

    data, disc_config, gen_config, checkpoint = prepare_inputs(args, accelerator, run_dir)
    accelerator.wait_for_everyone()  # every process has verified its checkpoint before the folder changes
    if accelerator.is_main_process:
        start_run_dir(
            run_dir, args.overwrite_output_dir, dict(vars(args), **derived_values(accelerator, data))
        )
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
