"""The pretraining script's argument checks (wikitext_trainer.py): the flag values its `parse_args` refuses,
the run name it defaults to, and the paths it checks before anything is read or written.

A refused flag value is reported as argparse reports its own (usage, then `wikitext_trainer.py: error: ...`,
exit 2); a path problem is an InputError naming the flag (one line and exit 2, from the trainer's `main`).
The architecture checks of `--init_discriminator_from` are init_checkpoint.py's, the model's own
ElectraMoEConfig's (pretrain_models.model_shape_error), the scaling flags' distributed.py's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import distributed
from init_checkpoint import init_flags_error
from input_checks import TOKENIZER_FIX, InputError, check_tokenizer_path, check_utf8, check_writable
from modeling_electra_config import MOE_FIELDS, ignored_settings_error
from pretrain_data import WORDPIECE_SPECIAL_TOKENS
from pretrain_models import model_shape_error

MIN_SEQ_LENGTH = 16  # [CLS], [SEP] and room for ELECTRA's masking (int((0.15 + 0.005) x 16) = 2 tokens)


def check_pretraining_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag values that cannot run or would mislead: `parser.error` (usage, one line, exit 2)."""
    positive = ["max_seq_length", "batch_size", "gradient_accumulation_steps", "num_epochs", "logging_steps"]
    positive += ["eval_steps", "save_steps", "save_total_limit", "preprocessing_num_workers"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_training_steps", "max_eval_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.mask_prob is not None and not 0 < args.mask_prob < 1:
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
    problem = (
        run_values_error(parser, args)
        or init_flags_error(parser, args)
        or model_shape_error(args)
        or distributed.scaling_flags_error(args)
    )
    if problem:
        parser.error(problem)


def run_values_error(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Values that would run but mislead: a negative learning rate, blocks too short to mask, fp16 on the
    CPU, MoE flags the chosen layout or router ignores (refused, not stored in the config)."""
    if args.learning_rate is not None and not args.learning_rate > 0:
        return f"--learning_rate {args.learning_rate} must be > 0"
    if args.max_seq_length < MIN_SEQ_LENGTH:
        return (
            f"--max_seq_length {args.max_seq_length} is too short: a block needs [CLS], [SEP] and enough "
            f"tokens to mask (--mask_prob {args.mask_prob}); pass {MIN_SEQ_LENGTH} or more"
        )
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        return "--mixed_precision fp16 needs a CUDA device; on the CPU pass --mixed_precision no or bf16"
    if args.init_discriminator_from:  # the checkpoint's layout: init_flags_error checks these flags
        return None
    given = {
        name: getattr(args, name) for name in MOE_FIELDS if getattr(args, name) != parser.get_default(name)
    }
    return ignored_settings_error(given, args.num_experts, args.router_type)


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


def check_paths(args: argparse.Namespace) -> None:
    """Output folders writable, tokenizer and text files readable: each problem named by its flag."""
    check_writable(Path(args.model_save_directory), "--model_save_directory")
    check_writable(Path(args.data_cache_dir), "--data_cache_dir")
    if args.train_tokenizer is None:
        check_tokenizer_path(args.tokenizer_name, fix=f"{TOKENIZER_FIX}, or --train_tokenizer")
    for flag, paths in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        for path in paths or []:
            if os.path.isdir(path):
                raise InputError(
                    f"{flag} {path} is a folder; pass text files (or a glob) or json/csv/parquet files"
                )
            if Path(path).suffix.lower() != ".parquet" and os.path.isfile(path):
                check_utf8(Path(path), flag)
