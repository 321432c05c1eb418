"""Pretraining data: text -> articles -> examples -> cached token blocks, the tokenizer, and the data order.

WikiText keeps one paragraph per line with ` = Title = ` headings; `group_into_articles` turns the lines
back into articles, `tokenize_into_blocks` packs the tokenized articles into fixed-length `[CLS] ... [SEP]`
blocks, and `prepare_blocks` caches the blocks on disk under a key of everything they depend on.
`epoch_batches` is the seeded data order a resumed run repeats exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from input_checks import InputError
from outputs import write_atomically

logger = logging.getLogger("wikitext_trainer")

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
                cause = error
                while cause.__cause__ or cause.__context__:  # datasets wraps the reason (e.g. not UTF-8)
                    cause = cause.__cause__ or cause.__context__
                raise InputError(
                    f"could not read --{split}_file {info['path']} as {builder}: {error} ({cause})"
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
        dtype = getattr(dataset.features[column], "dtype", type(dataset.features[column]).__name__)
        if dtype not in ("string", "large_string"):
            raise InputError(
                f"--text_column_name {column} names a column of {dtype} values in the {split} data, not text; "
                f"pass the name of a text column (columns: {dataset.column_names})"
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
