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
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("wikitext_trainer")

# --- Data ------------------------------------------------------------------------------------------------
DEFAULT_DATASET_NAME = "Salesforce/wikitext"
DEFAULT_DATASET_CONFIG = "wikitext-103-raw-v1"
# The original study's tokenizer; ../shared/data/electra-vocab is the same vocabulary, offline.
DEFAULT_TOKENIZER = "google/electra-base-discriminator"
DEFAULT_TEXT_COLUMN = "text"
# Held out from the training blocks when the data has no validation split (as in transformers' run_mlm).
VALIDATION_SPLIT_PERCENTAGE = 5
VALIDATION_SPLIT_SEED = 0
MAX_SEQ_LENGTH = 128  # ELECTRA-Small's sequence length (paper, Table 6)
TOKENIZE_BATCH_SIZE = 256  # articles per tokenizer call / datasets.map batch
MAX_PREPROCESSING_WORKERS = 8
# Bump when the block layout changes, so old caches are not reused.
DATA_CACHE_VERSION = 1
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# WikiText splits hyphens and number separators into " @-@ ", " @,@ ", " @.@ "; undo it before tokenizing.
WIKITEXT_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
# A top-level heading is " = Title = "; sub-headings (" = = Section = = ") continue the article.
ARTICLE_HEADING = re.compile(r"^= (?!=)(.*?) =$")
SUBHEADING = re.compile(r"^(?:= ){2,}(.*?)(?: =){2,}$")
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# --- Objective (ELECTRA paper and google-research/electra configure_pretraining.py) -------------------------
MASK_PROB = 0.15
# pretrain_helpers.mask(): 85% of the selected positions become [MASK], the other 15% stay unchanged.
MASK_TOKEN_FRACTION = 0.85
GEN_WEIGHT = 1.0
DISC_WEIGHT = 50.0

# --- Optimisation (ELECTRA paper, Table 6) ------------------------------------------------------------------
LEARNING_RATE_BY_PRESET = {"tiny": 5e-4, "small": 5e-4, "base": 2e-4, "large": 2e-4}
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
REQUEUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "try again", what a Slurm job script requeues on
USAGE_ERROR_EXIT_CODE = 2  # what argparse uses for bad command lines
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
TRAINING_ARGS_FILE = "training_args.json"
SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "embedding_size",
)
MOE_FIELDS = (
    "num_experts",
    "top_k",
    "moe_layers",
    "moe_layer_frequency",
    "expert_intermediate_size",
    "capacity_factor",
    "router_type",
    "norm_topk_prob",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "moe_implementation",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every flag's default."""


class InputError(ValueError):
    """Bad data, tokenizer or model flags: reported as a one-line error before any model is built."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modeling_electra_config import (
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
        "--data_cache_dir",
        help="where tokenized blocks are cached (default: <model_save_directory>/data_cache)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(PRESETS), default="small", help="ELECTRA size preset")
    for field in SIZE_FIELDS:
        model.add_argument(f"--{field}", type=int, help=f"override the preset's {field}")
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

    objective = parser.add_argument_group("objective")
    objective.add_argument("--mask_prob", type=float, default=MASK_PROB, help="share of tokens masked")
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
    if args.model_save_name is None:
        args.model_save_name = default_run_name(args)
    if args.data_cache_dir is None:
        args.data_cache_dir = os.path.join(args.model_save_directory, "data_cache")
    if args.learning_rate is None:
        args.learning_rate = LEARNING_RATE_BY_PRESET[args.model_size]
    return args


def default_run_name(args: argparse.Namespace) -> str:
    """`electra-small` for the dense baseline, `electra-small-moe8-top2` for an MoE model."""
    name = f"electra-{args.model_size}"
    return name if args.num_experts == 1 else f"{name}-moe{args.num_experts}-top{args.top_k}"


def fail(message: str) -> NoReturn:
    """Stop with a message saying what to fix, exit status 2 like argparse."""
    print(f"wikitext_trainer.py: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR_EXIT_CODE)


# ----------------------------------------------------------------------------------------------------------
# Data: WikiText lines -> articles -> fixed-length [CLS] ... [SEP] blocks, cached on disk
# ----------------------------------------------------------------------------------------------------------


def describe_data_source(args: argparse.Namespace) -> dict[str, Any]:
    """What the cache key depends on; local files must exist and be non-empty (checked here, early)."""
    common = {"column": args.text_column_name, "holdout": args.validation_split_percentage}
    if not args.train_file:
        return {"hub": args.dataset_name, "config": args.dataset_config_name, **common}
    files = {}
    for split, path in (("train", args.train_file), ("validation", args.validation_file)):
        if path is None:
            continue
        flag = f"--{split}_file"
        if not os.path.isfile(path):
            raise InputError(f"{flag} {path} does not exist")
        stat = os.stat(path)
        if stat.st_size == 0:
            raise InputError(f"{flag} {path} is empty")
        files[split] = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"files": files, **common}


def cache_key(*parts: Any) -> str:
    blob = json.dumps([DATA_CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_raw_splits(source: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Load the raw line datasets: the Hub dataset's train/validation splits, or local files."""
    import datasets

    if "hub" in source:
        try:
            raw = datasets.load_dataset(source["hub"], source["config"])
        except Exception as error:  # the Hub raises many types: offline, unknown config, ...
            raise InputError(
                f"could not load dataset {source['hub']}/{source['config']} ({error}); "
                "pass --train_file/--validation_file to train on local text"
            ) from error
        splits = {split: raw[split] for split in ("train", "validation") if split in raw}
    else:
        splits = {}
        for split, info in source["files"].items():
            suffix = Path(info["path"]).suffix.lower()
            builder = LOCAL_BUILDERS.get(suffix, "text")
            try:
                splits[split] = datasets.load_dataset(
                    builder,
                    data_files={split: info["path"]},
                    split=split,
                    cache_dir=os.path.join(cache_dir, "raw"),
                )
            except Exception as error:
                raise InputError(
                    f"could not read --{split}_file {info['path']} as {builder}: {error}"
                ) from error
    if "train" not in splits:
        raise InputError("the dataset has no 'train' split")
    column = source["column"]
    for split, dataset in splits.items():
        if column not in dataset.column_names:
            raise InputError(
                f"the {split} data has no column '{column}' (columns: {dataset.column_names}); "
                "pass --text_column_name"
            )
    return splits


def clean_wikitext(text: str) -> str:
    for marker, joined in WIKITEXT_JOINERS.items():
        text = text.replace(marker, joined)
    return text.strip()


def group_into_articles(lines: Iterable[str | None]) -> list[str]:
    """Regroup WikiText's one-paragraph-per-line layout into one string per article.

    A ` = Title = ` line starts a new article (the title becomes its first line); ` = = Section = = `
    sub-headings keep their words and stay inside the current article. Empty lines are dropped.
    """
    articles: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        text = clean_wikitext(line or "")
        if not text:
            continue
        heading = ARTICLE_HEADING.match(text)
        if heading:
            if current:
                articles.append(current)
            current = [heading.group(1)]
            continue
        subheading = SUBHEADING.match(text)
        current.append(subheading.group(1) if subheading else text)
    if current:
        articles.append(current)
    return ["\n".join(parts) for parts in articles]


def tokenize_into_blocks(batch: dict[str, list[str]], tokenizer: Any, max_seq_length: int) -> dict[str, list]:
    """Tokenize a batch of articles, join them with [SEP] and cut the stream into `[CLS] ... [SEP]` blocks.

    The tail shorter than one block is dropped (at most `max_seq_length - 2` tokens per map batch).
    """
    encoded = tokenizer(
        batch["text"],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        if ids:
            stream.extend(ids)
            stream.append(tokenizer.sep_token_id)
    body = max_seq_length - 2
    blocks = [
        [tokenizer.cls_token_id, *stream[start : start + body], tokenizer.sep_token_id]
        for start in range(0, len(stream) - body + 1, body)
    ]
    return {"input_ids": blocks}


def build_blocks(raw_split: Any, column: str, tokenizer: Any, max_seq_length: int, num_workers: int) -> Any:
    """Articles -> token blocks as a `datasets.Dataset` with a fixed-length int32 `input_ids` column."""
    import datasets

    articles = group_into_articles(raw_split[column])
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=max_seq_length)})
    dataset = datasets.Dataset.from_dict({"text": articles})
    workers = min(num_workers, math.ceil(len(articles) / TOKENIZE_BATCH_SIZE))
    return dataset.map(
        tokenize_into_blocks,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        batched=True,
        batch_size=TOKENIZE_BATCH_SIZE,
        remove_columns=["text"],
        features=features,
        num_proc=workers if workers > 1 else None,
        desc="Tokenizing articles into blocks",
    )


def prepare_blocks(args: argparse.Namespace, tokenizer: Any, source: dict[str, Any]) -> dict[str, np.ndarray]:
    """Token blocks for the train and validation splits, from the on-disk cache when it matches.

    The cache key covers the data (Hub id/config, or each file's path, size and mtime), the tokenizer
    (its full serialized vocabulary and normalizer) and `max_seq_length`.
    """
    import datasets

    key = cache_key(source, tokenizer.backend_tokenizer.to_str(), args.max_seq_length)
    cache_path = Path(args.data_cache_dir) / f"blocks-{key}"
    if (cache_path / "dataset_dict.json").is_file():
        logger.info("Reusing tokenized data cache %s", cache_path)
    else:
        raw = load_raw_splits(source, args.data_cache_dir)
        blocks = datasets.DatasetDict()
        for split, raw_split in raw.items():
            blocks[split] = build_blocks(
                raw_split,
                args.text_column_name,
                tokenizer,
                args.max_seq_length,
                args.preprocessing_num_workers,
            )
            if len(blocks[split]) == 0:
                raise InputError(
                    f"the {split} corpus is smaller than one block of --max_seq_length {args.max_seq_length} "
                    "tokens; give more text or a smaller --max_seq_length"
                )
        if "validation" not in blocks:
            if len(blocks["train"]) < 2:
                raise InputError(
                    "the training corpus has one block: too little to hold out a validation share"
                )
            held_out = blocks["train"].train_test_split(
                test_size=args.validation_split_percentage / 100, seed=VALIDATION_SPLIT_SEED
            )
            blocks = datasets.DatasetDict(train=held_out["train"], validation=held_out["test"])
        write_atomically(cache_path, lambda tmp: blocks.save_to_disk(str(tmp)))
        logger.info("Wrote tokenized data cache %s", cache_path)
    cached = datasets.load_from_disk(str(cache_path))
    return {split: blocks_as_array(cached[split], args.max_seq_length) for split in ("train", "validation")}


def blocks_as_array(dataset: Any, max_seq_length: int) -> np.ndarray:
    """The fixed-length `input_ids` column as one [num_blocks, max_seq_length] int32 array (no Python lists)."""
    column = dataset.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, max_seq_length)


def write_atomically(final: Path, write: Any) -> None:
    """Write a directory under a temporary name and rename it into place; a crash leaves no partial `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():  # another process finished the same content first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)


def load_tokenizer(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    """The pretrained fast tokenizer, or a WordPiece vocabulary trained (once, then cached) on the train split."""
    from transformers import AutoTokenizer

    name = args.tokenizer_name
    if args.train_tokenizer is not None:
        path = Path(args.data_cache_dir) / f"tokenizer-{cache_key(source, args.train_tokenizer)}"
        if not (path / "vocab.txt").is_file():
            raw = load_raw_splits(source, args.data_cache_dir)
            articles = group_into_articles(raw["train"][args.text_column_name])
            write_atomically(path, lambda tmp: train_wordpiece(articles, args.train_tokenizer, tmp))
        name = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # OSError, ValueError, offline errors
        raise InputError(f"could not load tokenizer '{name}' ({error}); pass a local directory") from error
    if not tokenizer.is_fast:
        raise InputError(f"tokenizer '{name}' is not a fast tokenizer; batched tokenization needs one")
    missing = [
        t for t in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, t) is None
    ]
    if missing:
        raise InputError(f"tokenizer '{name}' lacks {missing}; ELECTRA needs [CLS], [SEP], [MASK] and [PAD]")
    return tokenizer


def train_wordpiece(articles: list[str], vocab_size: int, directory: Path) -> None:
    """Train an uncased BERT-style WordPiece vocabulary and save it loadable by `AutoTokenizer`."""
    from tokenizers import BertWordPieceTokenizer

    directory.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        articles, vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS, show_progress=False
    )
    wordpiece.save_model(str(directory))
    config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": True, "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Objective: masking, sampling and the generator + discriminator module
# ----------------------------------------------------------------------------------------------------------


def maskable_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_token_ids: torch.Tensor
) -> torch.Tensor:
    """Positions the masking may pick: real tokens that are not special ([CLS], [SEP], [PAD], [MASK], ...)."""
    return attention_mask.bool() & ~torch.isin(input_ids, special_token_ids)


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    mask_prob: float = MASK_PROB,
    mask_token_fraction: float = MASK_TOKEN_FRACTION,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `mask_prob` of the maskable positions; 85% of them become `[MASK]`, the rest stay unchanged.

    Returns `(masked_input_ids, is_masked)`. `maskable` is False for special tokens and padding.
    """
    draws = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    is_masked = (draws < mask_prob) & maskable
    keep_draws = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    use_mask_token = is_masked & (keep_draws < mask_token_fraction)
    return input_ids.masked_fill(use_mask_token, mask_token_id), is_masked


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row at temperature 1 by the Gumbel-max trick, in fp32 and without gradient."""
    logits = logits.detach().float()
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=-1)


def replace_tokens(
    input_ids: torch.Tensor, is_masked: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the sampled tokens at the masked positions; a token is "replaced" only if it differs.

    Returns `(discriminator_input_ids, replaced_labels)`: a sample equal to the original counts as original.
    """
    replaced_ids = input_ids.masked_scatter(is_masked, sampled.to(input_ids.dtype))
    return replaced_ids, (replaced_ids != input_ids).long()


def tie_generator_to_discriminator(generator: nn.Module, discriminator: nn.Module) -> None:
    """Share token, position and type embeddings (one module), as in ELECTRA; the LM head stays tied."""
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight


class ElectraPretrainingModel(nn.Module):
    """Generator and discriminator in one module, so accelerate/DDP sees a single forward and backward.

    `forward(input_ids)` masks, runs the generator on the masked positions, samples replacements and
    returns the combined loss `gen_weight * (MLM + generator router loss) + disc_weight * (RTD +
    discriminator router loss)` with detached
    statistics for logging (sums and counts, so they can be summed over batches and processes).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        tokenizer: Any,
        mask_prob: float = MASK_PROB,
        gen_weight: float = GEN_WEIGHT,
        disc_weight: float = DISC_WEIGHT,
    ):
        super().__init__()
        tie_generator_to_discriminator(generator, discriminator)
        # Registered first, so the shared embeddings are named (and checkpointed) as the discriminator's.
        self.discriminator = discriminator
        self.generator = generator
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.mask_prob = mask_prob
        self.gen_weight = gen_weight
        self.disc_weight = disc_weight
        special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.register_buffer("special_token_ids", special_ids, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        active = attention_mask.bool()
        maskable = maskable_positions(input_ids, attention_mask, self.special_token_ids)
        masked_ids, is_masked = mask_tokens(input_ids, maskable, self.mask_token_id, self.mask_prob)

        # Generator: MLM logits only at the masked positions (ELECTRA gathers them the same way).
        gen_out = self.generator.electra(masked_ids, attention_mask)
        gen_hidden = self.generator.generator_predictions(gen_out.last_hidden_state[is_masked])
        gen_logits = self.generator.generator_lm_head(gen_hidden).float()
        targets = input_ids[is_masked]
        num_masked = targets.numel()
        gen_loss = F.cross_entropy(gen_logits, targets) if num_masked else gen_logits.sum() * 0.0

        with torch.no_grad():
            sampled = sample_tokens(gen_logits)
        disc_input, labels = replace_tokens(input_ids, is_masked, sampled)
        disc_out = self.discriminator(disc_input, attention_mask)
        disc_logits = disc_out.logits[active].float()
        disc_labels = labels[active].float()
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits, disc_labels)

        # Each model's router loss is weighted like its own task loss, so router_aux_loss_coef keeps the
        # meaning it has in Switch Transformer (relative to the task loss) despite RTD's weight of 50.
        router_loss = self.gen_weight * gen_out.router_loss + self.disc_weight * disc_out.router_loss
        loss = self.gen_weight * gen_loss + self.disc_weight * disc_loss + router_loss
        with torch.no_grad():
            predicted = disc_logits > 0
            actual = disc_labels > 0.5
            stats = {
                "loss": loss.detach(),
                "gen_loss": gen_loss.detach(),
                "disc_loss": disc_loss.detach(),
                "router_loss": router_loss.detach(),
                "gen_router_loss": gen_out.router_loss.detach(),
                "disc_router_loss": disc_out.router_loss.detach(),
                "aux_loss": disc_out.aux_loss.detach(),
                "z_loss": disc_out.z_loss.detach(),
                "masked": torch.tensor(float(num_masked), device=input_ids.device),
                "gen_correct": (gen_logits.argmax(-1) == targets).sum().float(),
                "tokens": active.sum().float(),
                "disc_correct": (predicted == actual).sum().float(),
                "replaced": actual.sum().float(),
                "predicted_replaced": predicted.sum().float(),
                "true_positives": (predicted & actual).sum().float(),
            }
            for prefix, out in (("", disc_out), ("gen_", gen_out)):
                if out.expert_load is not None:
                    stats[f"{prefix}expert_load"] = out.expert_load.detach().float()
                    stats[f"{prefix}router_entropy"] = out.router_entropy.detach().float()
                    stats[f"{prefix}dropped_fraction"] = out.dropped_fraction.detach().float()
            if gen_out.expert_load is not None:
                stats["gen_aux_loss"] = gen_out.aux_loss.detach()
                stats["gen_z_loss"] = gen_out.z_loss.detach()
        return {"loss": loss, **{f"stats/{name}": value for name, value in stats.items()}}


def build_model_configs(
    args: argparse.Namespace, tokenizer_size: int, pad_token_id: int = 0
) -> tuple[Any, Any]:
    """Discriminator config from the size preset plus flags, and the matching generator config."""
    from modeling_electra_config import ElectraMoEConfig, make_generator_config

    sizes = {name: getattr(args, name) for name in SIZE_FIELDS if getattr(args, name) is not None}
    moe = {name: getattr(args, name) for name in MOE_FIELDS}
    try:
        disc = ElectraMoEConfig.from_preset(
            args.model_size, vocab_size=tokenizer_size, pad_token_id=pad_token_id, **sizes, **moe
        )
        if args.max_seq_length > disc.max_position_embeddings:
            raise ValueError(
                f"max_seq_length must be <= max_position_embeddings ({disc.max_position_embeddings})"
            )
        gen = make_generator_config(
            disc, generator_size=args.generator_size, generator_moe=args.generator_moe
        )
    except ValueError as error:
        raise InputError(str(error)) from error
    return disc, gen


def build_models(disc_config: Any, gen_config: Any) -> tuple[nn.Module, nn.Module]:
    from modeling_electra import ElectraMoEForMaskedLM, ElectraMoEForPreTraining

    return ElectraMoEForMaskedLM(gen_config), ElectraMoEForPreTraining(disc_config)


def optimizer_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay everywhere except biases and LayerNorm (ELECTRA's exclusion list)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY_KEYS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, so resuming at (epoch, batch) repeats the same batches
# ----------------------------------------------------------------------------------------------------------


def epoch_batches(
    num_examples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """This process's micro-batches (index arrays) for one epoch; incomplete batches are dropped.

    Ranks take interleaved examples, so N processes with batch b see, step by step, the same global
    batches as one process with batch N*b.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    per_rank = num_examples // world_size
    shard = order[: per_rank * world_size][rank::world_size]
    return [shard[i : i + batch_size] for i in range(0, per_rank - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


class MetricWindow:
    """Sums the model's statistics over micro-batches; `summary` reduces over processes into metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        for name, value in outputs.items():
            if name.startswith("stats/"):
                key = name[len("stats/") :]
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.batches += 1

    def summary(self, accelerator: Any) -> dict[str, Any]:
        device = next(iter(self.sums.values())).device
        sums = dict(self.sums, batches=torch.tensor(float(self.batches), device=device))
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        batches = sums["batches"].item()
        mean = {name: (value / batches) for name, value in sums.items()}
        replaced, predicted, tp = (
            sums[k].item() for k in ("replaced", "predicted_replaced", "true_positives")
        )
        tokens = sums["tokens"].item()
        metrics: dict[str, Any] = {
            "loss": mean["loss"].item(),
            "gen_loss": mean["gen_loss"].item(),
            "disc_loss": mean["disc_loss"].item(),
            "router_loss": mean["router_loss"].item(),
            "gen_accuracy": sums["gen_correct"].item() / max(sums["masked"].item(), 1.0),
            "disc_accuracy": sums["disc_correct"].item() / max(tokens, 1.0),
            # Replaced-token F1 (positive class: replaced); 0 when nothing is predicted or replaced.
            "disc_f1": 2 * tp / max(replaced + predicted, 1.0),
            "disc_precision": tp / max(predicted, 1.0),
            "disc_recall": tp / max(replaced, 1.0),
            # Accuracy of always answering "original": what disc_accuracy must beat.
            "disc_baseline_accuracy": 1.0 - replaced / max(tokens, 1.0),
            "replaced_fraction": replaced / max(tokens, 1.0),
            "aux_loss": mean["aux_loss"].item(),
            "z_loss": mean["z_loss"].item(),
        }
        for name in (
            "expert_load",
            "router_entropy",
            "dropped_fraction",
            "gen_expert_load",
            "gen_router_entropy",
        ):
            if name in mean:
                metrics[name] = mean[name].tolist()
        for name in ("gen_aux_loss", "gen_z_loss"):
            if name in mean:
                metrics[name] = mean[name].item()
        return metrics

    @property
    def tokens(self) -> float:
        return self.sums["tokens"].item() if "tokens" in self.sums else 0.0


def write_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def tensorboard_scalars(split: str, metrics: dict[str, Any]) -> dict[str, float]:
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


@torch.no_grad()
def evaluate(
    model: nn.Module, blocks: np.ndarray, batch_size: int, accelerator: Any, seed: int
) -> dict[str, Any]:
    """Metrics on this process's share of the validation blocks, with a fixed masking seed.

    The fixed seed makes evaluations comparable across steps and leaves the training RNG untouched.
    """
    module = accelerator.unwrap_model(model)
    module.eval()
    window = MetricWindow()
    with torch.random.fork_rng(devices=rng_devices(accelerator)):
        torch.manual_seed(seed)
        shard = np.arange(accelerator.process_index, len(blocks), accelerator.num_processes)
        for start in range(0, len(shard), batch_size):
            input_ids = torch.as_tensor(blocks[shard[start : start + batch_size]], dtype=torch.long)
            window.add(module(input_ids.to(accelerator.device)))
    module.train()
    return window.summary(accelerator)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and stop signals
# ----------------------------------------------------------------------------------------------------------


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
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


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
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("Saved checkpoint %s", final)
    return final


def resolve_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
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


def rng_devices(accelerator: Any) -> list[int]:
    return [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []


# ----------------------------------------------------------------------------------------------------------
# Main: args -> data -> model -> loop -> outputs
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Installed first: a SIGTERM/SIGUSR1 at any point (even during preprocessing) ends in a checkpoint + 75.
    stop = StopRequest()
    with stop_signal_handlers(stop):
        return pretrain(args, stop)


def pretrain(args: argparse.Namespace, stop: StopRequest) -> int:
    """Data -> model -> loop -> outputs; returns the exit status (0, or 75 after a stop signal)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    run_dir = Path(args.model_save_directory) / args.model_save_name
    accelerator = Accelerator(
        # Without an accelerator, say so: accelerate then runs torchrun's processes as CPU DDP (gloo).
        cpu=args.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)

    # Data and configs: every input error surfaces here, before any model is built.
    try:
        check_run_dir(args, run_dir)
        source = describe_data_source(args)
        with accelerator.main_process_first():
            tokenizer = load_tokenizer(args, source)
            disc_config, gen_config = build_model_configs(args, len(tokenizer), tokenizer.pad_token_id)
            blocks = prepare_blocks(args, tokenizer, source)
        train_blocks, valid_blocks = blocks["train"], blocks["validation"][: args.max_eval_blocks]
        micro_batches = len(
            epoch_batches(len(train_blocks), args.batch_size, 0, args.seed, 0, accelerator.num_processes)
        )
        steps_per_epoch = micro_batches // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise InputError(
                f"{len(train_blocks)} training blocks are fewer than one optimizer step needs "
                f"(--batch_size {args.batch_size} x --gradient_accumulation_steps {args.gradient_accumulation_steps} "
                f"x {accelerator.num_processes} processes)"
            )
        if len(valid_blocks) < accelerator.num_processes:
            raise InputError(
                f"{len(valid_blocks)} validation blocks cannot be shared by {accelerator.num_processes} processes"
            )
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run_dir)
    except InputError as error:
        fail(str(error))
    micro_batches_per_epoch = steps_per_epoch * args.gradient_accumulation_steps
    total_steps = args.max_training_steps or args.num_epochs * steps_per_epoch
    if args.warmup_steps >= total_steps:
        logger.warning(
            "--warmup_steps %d >= %d training steps: the peak learning rate is never reached",
            args.warmup_steps,
            total_steps,
        )

    if accelerator.is_main_process:
        if args.overwrite_output_dir and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / CHECKPOINT_DIR).glob(f"{TMP_CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        resolved = dict(
            vars(args),
            vocab_size=len(tokenizer),
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            num_processes=accelerator.num_processes,
            train_blocks=len(train_blocks),
            validation_blocks=len(valid_blocks),
        )
        (run_dir / TRAINING_ARGS_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
    accelerator.wait_for_everyone()
    logger.info(
        "%d train / %d validation blocks of %d tokens; %d optimizer steps (%d per epoch)",
        len(train_blocks),
        len(valid_blocks),
        args.max_seq_length,
        total_steps,
        steps_per_epoch,
    )

    # Model: the generator shares the discriminator's embeddings; one module for accelerate.
    set_seed(args.seed)
    generator, discriminator = build_models(disc_config, gen_config)
    model = ElectraPretrainingModel(
        generator, discriminator, tokenizer, args.mask_prob, args.gen_weight, args.disc_weight
    )
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPSILON,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
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

    global_step, epoch, start_batch = 0, 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        global_step, epoch, start_batch = state["global_step"], state["epoch"], state["batch_index"]
        logger.info(
            "Resumed from %s at step %d (epoch %d, batch %d)", checkpoint, global_step, epoch, start_batch
        )
    if accelerator.is_main_process:
        truncate_metrics(run_dir, global_step)
    accelerator.init_trackers("tensorboard")

    # Loop.
    window = MetricWindow()
    window_start, paused = time.perf_counter(), 0.0
    last_eval_step = -1
    bar = tqdm(
        total=total_steps,
        initial=global_step,
        desc="pretraining",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    while global_step < total_steps:
        batches = epoch_batches(
            len(train_blocks),
            args.batch_size,
            epoch,
            args.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )[:micro_batches_per_epoch]
        for batch_index in range(start_batch, len(batches)):
            input_ids = torch.as_tensor(train_blocks[batches[batch_index]], dtype=torch.long)
            with accelerator.accumulate(model):
                outputs = model(input_ids.to(accelerator.device))
                accelerator.backward(outputs["loss"])
                window.add(outputs)
                if not accelerator.sync_gradients:
                    continue
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            bar.update(1)
            position = {"global_step": global_step, "epoch": epoch, "batch_index": batch_index + 1}

            if global_step % args.logging_steps == 0 or global_step == total_steps:
                seconds = time.perf_counter() - window_start - paused
                tokens = window.tokens * accelerator.num_processes
                metrics = window.summary(accelerator)
                metrics.update(
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    tokens_per_second=tokens / max(seconds, 1e-9),
                )
                log_metrics(accelerator, run_dir, global_step, epoch, "train", metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                window = MetricWindow()
                window_start, paused = time.perf_counter(), 0.0

            pause_start = time.perf_counter()
            if global_step % args.eval_steps == 0 or global_step == total_steps:
                metrics = evaluate(model, valid_blocks, args.batch_size, accelerator, args.seed)
                log_metrics(accelerator, run_dir, global_step, epoch, "validation", metrics)
                last_eval_step = global_step

            stop_now = stop_requested(stop, accelerator)
            if stop_now or global_step % args.save_steps == 0:
                save_checkpoint(accelerator, run_dir, position, args.save_total_limit)
            paused += time.perf_counter() - pause_start
            if stop_now:
                logger.warning(
                    "Stop signal received: checkpoint at step %d written, exiting with %d for requeue",
                    global_step,
                    REQUEUE_EXIT_CODE,
                )
                bar.close()
                accelerator.end_training()
                return REQUEUE_EXIT_CODE
            if global_step >= total_steps:
                break
        else:  # the epoch ran to its end (not stopped at total_steps)
            epoch, start_batch = epoch + 1, 0
    bar.close()

    # Outputs: discriminator/ (what run_glue.py takes) and generator/, each with the tokenizer.
    if last_eval_step != global_step:
        log_metrics(
            accelerator,
            run_dir,
            global_step,
            epoch,
            "validation",
            evaluate(model, valid_blocks, args.batch_size, accelerator, args.seed),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_models(accelerator.unwrap_model(model), tokenizer, run_dir)
        if args.push_to_hub:
            push_to_hub(accelerator.unwrap_model(model), tokenizer, args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    logger.info("Finished: %s", run_dir)
    return 0


def stop_requested(stop: StopRequest, accelerator: Any) -> bool:
    """True on every process once any process got a stop signal."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    flag = torch.tensor(float(stop.signal is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag.item() > 0)


def log_metrics(
    accelerator: Any, run_dir: Path, step: int, epoch: int, split: str, metrics: dict[str, Any]
) -> None:
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


def save_final_models(model: ElectraPretrainingModel, tokenizer: Any, run_dir: Path) -> None:
    """Write generator/ and discriminator/ (last, it marks the run finished) via temp dirs and renames."""
    for name in ("generator", "discriminator"):
        final = run_dir / name
        if final.exists():
            shutil.rmtree(final)
        write_atomically(final, partial(save_pretrained_with_tokenizer, getattr(model, name), tokenizer))


def save_pretrained_with_tokenizer(part: nn.Module, tokenizer: Any, directory: Path) -> None:
    part.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def push_to_hub(model: ElectraPretrainingModel, tokenizer: Any, args: argparse.Namespace) -> None:
    repo = args.hub_model_id or args.model_save_name
    for part, repo_id in ((model.discriminator, repo), (model.generator, f"{repo}-generator")):
        part.push_to_hub(repo_id)
        tokenizer.push_to_hub(repo_id)


if __name__ == "__main__":
    sys.exit(main())
