"""Pretraining data: text -> articles -> examples -> cached token blocks, the tokenizer, and the data order.

WikiText keeps one paragraph per line with ` = Title = ` headings; `group_into_articles` turns the lines
back into articles (the documents). `--example_format electra` (the default) builds ELECTRA's examples
from each document's lines (`tokenize_into_examples`: `[CLS] A [SEP] B [SEP]` with token type ids 0/1,
padded, never crossing a document); `--example_format packed` (the original study's) packs the tokenized
articles into fixed-length `[CLS] ... [SEP]` blocks (`tokenize_into_blocks`). `prepare_blocks` caches
the examples on disk under a key of everything they depend on; `epoch_batches` is the seeded data order a
resumed run repeats exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from input_checks import InputError
from outputs import write_atomically

logger = logging.getLogger(__name__)

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
# Pretraining examples: ELECTRA's two-segment examples (the default) or the original study's packed blocks.
EXAMPLE_FORMATS = ("electra", "packed")
# ELECTRA's ExampleBuilder (build_pretraining_dataset.py): one segment with p 0.1; a short example
# (target length randint(5, max_length)) with p 0.05.
SINGLE_SEGMENT_PROB = 0.1
SHORT_EXAMPLE_PROB = 0.05
MIN_SHORT_EXAMPLE_LENGTH = 5
EXAMPLE_SEED = 0  # fixed, like VALIDATION_SPLIT_SEED: the cached examples do not depend on --seed


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


# --- ELECTRA's examples (build_pretraining_dataset.py, ExampleBuilder) ---------------------------------------


def draw_target_length(rng: random.Random, max_length: int) -> int:
    """ELECTRA's length of the next example: `randint(5, max_length)` with probability 0.05, else `max_length`."""
    if rng.random() < SHORT_EXAMPLE_PROB:
        return rng.randint(min(MIN_SHORT_EXAMPLE_LENGTH, max_length), max_length)
    return max_length


def split_segments(
    sentences: list[list[int]], target_length: int, max_length: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """ELECTRA's `_create_example`: the sentences as segments A and B, truncated to fit `max_length`.

    With probability 0.1 everything goes to A (one segment, as in single-sentence tasks); otherwise A
    targets `(target_length - 3) // 2` tokens: a sentence joins A when A is empty, when it fits, or with
    probability 0.5 when it would overflow A while B is still empty; every later sentence goes to B.
    """
    # -3: [CLS] and two [SEP] are not added yet
    single = rng.random() < SINGLE_SEGMENT_PROB
    first_target = 100_000 if single else (target_length - 3) // 2
    first: list[int] = []
    second: list[int] = []
    for sentence in sentences:
        if (
            len(first) == 0
            or len(first) + len(sentence) < first_target
            or (len(second) == 0 and len(first) < first_target and rng.random() < 0.5)
        ):
            first += sentence
        else:
            second += sentence
    first = first[: max_length - 2]
    second = second[: max(0, max_length - len(first) - 3)]
    return first, second


def document_examples(
    sentences: list[list[int]], max_length: int, rng: random.Random, special: dict[str, int]
) -> tuple[list[list[int]], list[list[int]]]:
    """One document's examples as ELECTRA's ExampleBuilder makes them: `(input_ids, token_type_ids)` rows.

    Lines are added until the example reaches its target length (the last line may overflow; truncation
    cuts it), the document's remainder makes a last, shorter example, and no example crosses documents.
    Rows are `[CLS] A [SEP] B [SEP]` (type ids 0 on `[CLS] A [SEP]`, 1 on `B [SEP]`) padded to `max_length`.
    """
    input_ids, token_type_ids = [], []
    target = draw_target_length(rng, max_length)
    current: list[list[int]] = []
    length = 0
    for index, sentence in enumerate(sentences):
        current.append(sentence)
        length += len(sentence)
        if length >= target or (index == len(sentences) - 1 and length > 0):
            first, second = split_segments(current, target, max_length, rng)
            ids = [special["cls"], *first, special["sep"]]
            types = [0] * len(ids)
            if second:
                ids += [*second, special["sep"]]
                types += [1] * (len(second) + 1)
            input_ids.append(ids + [special["pad"]] * (max_length - len(ids)))
            token_type_ids.append(types + [0] * (max_length - len(types)))
            current, length = [], 0
            target = draw_target_length(rng, max_length)
    return input_ids, token_type_ids


def tokenize_into_examples(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_seq_length: int
) -> dict[str, list]:
    """Tokenize each article's lines and build ELECTRA's two-segment examples, one document per article.

    Each article draws from its own RNG, seeded by its index, so the examples do not depend on the number
    of preprocessing workers. (ELECTRA's builder keeps one RNG per job, and carries the next target length
    across documents; drawing it afresh at each document start has the same distribution.)
    """
    lines = [article.split("\n") for article in batch["text"]]
    flat = [line for article in lines for line in article]
    encoded = tokenizer(
        flat,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    out: dict[str, list] = {"input_ids": [], "token_type_ids": []}
    start = 0
    for index, article in zip(indices, lines, strict=True):
        sentences = encoded[start : start + len(article)]
        start += len(article)
        rng = random.Random(f"{EXAMPLE_SEED}-{index}")
        ids, types = document_examples(sentences, max_seq_length, rng, special)
        out["input_ids"] += ids
        out["token_type_ids"] += types
    return out


# --- Cached blocks ----------------------------------------------------------------------------------------------


def build_blocks(
    raw_split: Any, column: str, tokenizer: Any, max_seq_length: int, num_workers: int, example_format: str
) -> Any:
    """Articles -> fixed-length examples as a `datasets.Dataset`: an int32 `input_ids` column, and for
    ELECTRA's examples an int8 `token_type_ids` column."""
    import datasets

    articles = group_into_articles(raw_split[column])
    columns = {"input_ids": datasets.List(datasets.Value("int32"), length=max_seq_length)}
    if example_format == "electra":
        columns["token_type_ids"] = datasets.List(datasets.Value("int8"), length=max_seq_length)
    dataset = datasets.Dataset.from_dict({"text": articles})
    workers = min(num_workers, math.ceil(len(articles) / TOKENIZE_BATCH_SIZE))
    electra = example_format == "electra"
    return dataset.map(
        tokenize_into_examples if electra else tokenize_into_blocks,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        with_indices=electra,
        batched=True,
        batch_size=TOKENIZE_BATCH_SIZE,
        remove_columns=["text"],
        features=datasets.Features(columns),
        num_proc=workers if workers > 1 else None,
        desc=f"Tokenizing articles into {example_format} examples",
    )


def prepare_blocks(
    args: argparse.Namespace, tokenizer: Any, source: dict[str, Any]
) -> dict[str, dict[str, np.ndarray]]:
    """Examples for the train and validation splits, from the on-disk cache when it matches.

    Returns `{split: {"input_ids": [N, max_seq_length] int32, "token_type_ids": ... (electra format)}}`.
    The cache key covers the data (Hub id/config, or each file's path, size and mtime), the tokenizer
    (its full serialized vocabulary and normalizer), `max_seq_length` and `example_format`.
    """
    import datasets

    key = cache_key(source, tokenizer.backend_tokenizer.to_str(), args.max_seq_length, args.example_format)
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
                args.example_format,
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
    return {split: columns_as_arrays(cached[split], args.max_seq_length) for split in ("train", "validation")}


def columns_as_arrays(dataset: Any, max_seq_length: int) -> dict[str, np.ndarray]:
    """Each fixed-length column as one [num_examples, max_seq_length] array (no Python lists)."""
    arrays = {}
    for name in dataset.column_names:
        column = dataset.data.column(name).combine_chunks()
        arrays[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, max_seq_length)
    return arrays


def batch_tensors(blocks: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The examples at `indices` as int64 tensors, keyed as the model's forward takes them."""
    return {name: torch.as_tensor(array[indices], dtype=torch.long) for name, array in blocks.items()}


def num_examples(blocks: dict[str, np.ndarray]) -> int:
    return len(blocks["input_ids"])


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
