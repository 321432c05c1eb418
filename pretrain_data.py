"""Pretraining data: files -> documents -> sentences -> examples -> cached token blocks, the tokenizer,
the memory-mapped reader, the data order and the optimizer steps it makes (`count_steps`).

`pretrain_documents.py` turns any layout into documents (`--document_format`) and documents into sentences.
`--example_format electra` (the default) builds ELECTRA's examples from each document's sentences
(`tokenize_into_examples`: `[CLS] A [SEP] B [SEP]` with token type ids 0/1, padded, never crossing a
document, every token kept); `--example_format packed` (the original study's) packs the tokenized
documents into fixed-length `[CLS] ... [SEP]` blocks (`tokenize_into_blocks`). `prepare_blocks` caches
the examples on disk under a key of everything they depend on, with `data_stats.json` beside them, and
hands training `MappedColumn`s that read the cached Arrow files in place; `epoch_batches` is the seeded
data order a resumed run repeats exactly.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from input_checks import InputError
from outputs import write_atomically
from pretrain_documents import (
    SEGMENTER,
    SNIFF_LINES,
    choose_document_format,
    documents_dataset,
    iter_column,
    segmenter_version,
    split_sentences,
)

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
TOKENIZE_BATCH_SIZE = 256  # documents per datasets.map batch with `packed` (its blocks are cut per batch)
# ... and with ELECTRA's examples, which do not depend on it: a worker's memory grows with the tokens of one
# batch (~0.3M for WikiText articles), never with the corpus.
EXAMPLE_BATCH_SIZE = 64
MAX_PREPROCESSING_WORKERS = 8
# Bump when the block layout changes, so old caches are not reused.
DATA_CACHE_VERSION = 2
DATA_STATS_FILE = "data_stats.json"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Pretraining examples: ELECTRA's two-segment examples (the default) or the original study's packed blocks.
EXAMPLE_FORMATS = ("electra", "packed")
# ELECTRA's ExampleBuilder (build_pretraining_dataset.py): one segment with p 0.1; a short example
# (target length randint(5, max_length)) with p 0.05.
SINGLE_SEGMENT_PROB = 0.1
SHORT_EXAMPLE_PROB = 0.05
MIN_SHORT_EXAMPLE_LENGTH = 5
EXAMPLE_SEED = 0  # fixed, like VALIDATION_SPLIT_SEED: the cached examples do not depend on --seed
# Per-row counts the tokenizing map emits for data_stats.json; summed, then dropped before the cache is saved.
COUNT_COLUMNS = ("documents", "sentences", "tokens", "tokens_in_examples")


def expand_file_patterns(patterns: list[str] | None) -> list[str] | None:
    """`--train_file a.txt b/*.jsonl`: each glob pattern replaced by its sorted matches (a pattern that
    matches nothing, like a plain path, is kept and reported missing later, by name)."""
    if patterns is None:
        return None
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else []
        paths += matches or [pattern]
    return paths


def describe_data_source(args: argparse.Namespace) -> dict[str, Any]:
    """What the cache key depends on; local files must exist and be non-empty (checked here, early)."""
    common = {
        "column": args.text_column_name,
        "holdout": args.validation_split_percentage,
        "document_format": args.document_format,
    }
    if not args.train_file:
        return {"hub": args.dataset_name, "config": args.dataset_config_name, **common}
    files = {}
    for split, paths in (("train", args.train_file), ("validation", args.validation_file)):
        if not paths:
            continue
        flag = f"--{split}_file"
        files[split] = [describe_file(path, flag) for path in paths]
        builders = {LOCAL_BUILDERS.get(Path(path).suffix.lower(), "text") for path in paths}
        if len(builders) > 1:
            raise InputError(
                f"{flag} mixes file kinds ({', '.join(sorted(builders))}); pass files of one kind"
            )
    return {"files": files, **common}


def describe_file(path: str, flag: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path} does not exist")
    stat = os.stat(path)
    if stat.st_size == 0:
        raise InputError(f"{flag} {path} is empty")
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(*parts: Any) -> str:
    blob = json.dumps([DATA_CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_raw_splits(source: dict[str, Any], cache_dir: str) -> dict[str, tuple[Any, str]]:
    """The raw datasets, `{split: (dataset, builder)}`: the Hub dataset's train/validation splits, or
    local files (several per split are read as one dataset, in the order given)."""
    import datasets

    if "hub" in source:
        try:
            raw = datasets.load_dataset(source["hub"], source["config"])
        except Exception as error:  # the Hub raises many types: offline, unknown config, ...
            raise InputError(
                f"could not load dataset {source['hub']}/{source['config']} ({error}); "
                "pass --train_file/--validation_file to train on local text"
            ) from error
        splits = {split: (raw[split], "hub") for split in ("train", "validation") if split in raw}
    else:
        splits = {}
        for split, files in source["files"].items():
            paths = [info["path"] for info in files]
            builder = LOCAL_BUILDERS.get(Path(paths[0]).suffix.lower(), "text")
            try:
                splits[split] = (
                    datasets.load_dataset(
                        builder,
                        data_files={split: paths},
                        split=split,
                        cache_dir=os.path.join(cache_dir, "raw"),
                    ),
                    builder,
                )
            except Exception as error:
                cause = error
                while cause.__cause__ or cause.__context__:  # datasets wraps the reason (e.g. not UTF-8)
                    cause = cause.__cause__ or cause.__context__
                raise InputError(
                    f"could not read --{split}_file {' '.join(paths)} as {builder}: {error} ({cause})"
                ) from error
    if "train" not in splits:
        raise InputError("the dataset has no 'train' split")
    for split, (dataset, _) in splits.items():
        check_text_column(dataset, source["column"], split)
    return splits


def check_text_column(dataset: Any, column: str, split: str) -> None:
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


def split_documents(
    raw_split: Any, builder: str, source: dict[str, Any], split: str, scratch: Path
) -> tuple[Any, str]:
    """The split's documents (a one-column `text` dataset) and the document format used (`auto` resolved
    and logged)."""
    column = source["column"]
    sample = raw_split.select(range(min(len(raw_split), SNIFF_LINES)))[column]
    document_format, reason = choose_document_format(source["document_format"], builder, sample)
    logger.info("%s data: --document_format %s (%s)", split, document_format, reason)
    return documents_dataset(raw_split, column, document_format, scratch), document_format


def tokenize_into_blocks(batch: dict[str, list[str]], tokenizer: Any, max_seq_length: int) -> dict[str, list]:
    """Tokenize a batch of documents, join them with [SEP] and cut the stream into `[CLS] ... [SEP]` blocks.

    The tail shorter than one block is dropped (at most `max_seq_length - 2` tokens per map batch). The
    batch's counts ride on its first block (a batch too short for one block is not counted).
    """
    encoded = tokenizer(
        [text or "" for text in batch["text"]],  # a null record is an empty document
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
    starts = range(0, len(stream) - body + 1, body)
    blocks = [
        [tokenizer.cls_token_id, *stream[start : start + body], tokenizer.sep_token_id] for start in starts
    ]
    counts = {name: [0] * len(blocks) for name in COUNT_COLUMNS}
    if blocks:
        counts["documents"][0] = sum(1 for ids in encoded if ids)
        counts["tokens"][0] = sum(len(ids) for ids in encoded)
        counts["tokens_in_examples"] = [
            sum(1 for token in block[1:-1] if token != tokenizer.sep_token_id) for block in blocks
        ]
    return {"input_ids": blocks, **counts}


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


def fill_examples(sentences: list[list[int]], max_length: int, rng: random.Random) -> list[tuple[list, int]]:
    """ELECTRA's `add_line` loop over one document: `(sentences, target_length)` per example.

    Sentences are added until the example holds `target_length - 3` tokens (room for [CLS] and two
    [SEP]). The sentence that crosses that line is cut there and its rest starts the next example, where
    ELECTRA's builder drops it: so no token is lost (a sentence longer than an example is spread over
    several). The document's remainder makes a last, shorter example; no example crosses documents.
    """
    examples = []
    pending = [sentence for sentence in reversed(sentences) if sentence]
    current: list[list[int]] = []
    length, target = 0, draw_target_length(rng, max_length)
    while pending:
        sentence = pending.pop()
        room = target - 3 - length  # >= 2: target >= 5 and an example is closed when full
        if len(sentence) > room:
            pending.append(sentence[room:])
            sentence = sentence[:room]
        current.append(sentence)
        length += len(sentence)
        if length >= target - 3 or not pending:
            examples.append((current, target))
            current, length, target = [], 0, draw_target_length(rng, max_length)
    return examples


def document_examples(
    sentences: list[list[int]], max_length: int, rng: random.Random, special: dict[str, int]
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """One document's examples: `(input_ids, token_type_ids, text tokens per example)`.

    Rows are `[CLS] A [SEP] B [SEP]` (type ids 0 on `[CLS] A [SEP]`, 1 on `B [SEP]`) padded to `max_length`,
    filled by `fill_examples` and split into segments by `split_segments`.
    """
    input_ids, token_type_ids, kept = [], [], []
    for current, target in fill_examples(sentences, max_length, rng):
        first, second = split_segments(current, target, max_length, rng)
        ids = [special["cls"], *first, special["sep"]]
        types = [0] * len(ids)
        if second:
            ids += [*second, special["sep"]]
            types += [1] * (len(second) + 1)
        input_ids.append(ids + [special["pad"]] * (max_length - len(ids)))
        token_type_ids.append(types + [0] * (max_length - len(types)))
        kept.append(len(first) + len(second))
    return input_ids, token_type_ids, kept


def tokenize_into_examples(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_seq_length: int
) -> dict[str, list]:
    """Split each document into sentences, tokenize them and build ELECTRA's two-segment examples.

    Each document draws from its own RNG, seeded by its index, so the examples do not depend on the number
    of preprocessing workers. (ELECTRA's builder keeps one RNG per job, and carries the next target length
    across documents; drawing it afresh at each document start has the same distribution.) A document's
    counts ride on its first example.
    """
    documents = [split_sentences(text or "") for text in batch["text"]]
    encoded = tokenizer(
        [sentence for sentences in documents for sentence in sentences],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    out: dict[str, list] = {name: [] for name in ("input_ids", "token_type_ids", *COUNT_COLUMNS)}
    start = 0
    for index, sentences in zip(indices, documents, strict=True):
        ids = [tokens for tokens in encoded[start : start + len(sentences)] if tokens]
        start += len(sentences)
        rows, types, kept = document_examples(
            ids, max_seq_length, random.Random(f"{EXAMPLE_SEED}-{index}"), special
        )
        out["input_ids"] += rows
        out["token_type_ids"] += types
        out["tokens_in_examples"] += kept
        for name, value in (("documents", 1), ("sentences", len(ids)), ("tokens", sum(map(len, ids)))):
            out[name] += [value] + [0] * (len(rows) - 1) if rows else []
    return out


# --- Cached blocks ----------------------------------------------------------------------------------------------


def build_blocks(
    documents: Any, tokenizer: Any, max_seq_length: int, num_workers: int, example_format: str, scratch: Path
) -> Any:
    """Documents -> fixed-length examples as a `datasets.Dataset`: an int32 `input_ids` column, for
    ELECTRA's examples an int8 `token_type_ids` column, and the int32 `COUNT_COLUMNS`. Batches of
    documents go to `num_workers` processes; the results are written under `scratch`."""
    import datasets

    columns = {"input_ids": datasets.List(datasets.Value("int32"), length=max_seq_length)}
    if example_format == "electra":
        columns["token_type_ids"] = datasets.List(datasets.Value("int8"), length=max_seq_length)
    columns.update({name: datasets.Value("int32") for name in COUNT_COLUMNS})
    electra = example_format == "electra"
    batch_size = EXAMPLE_BATCH_SIZE if electra else TOKENIZE_BATCH_SIZE
    workers = min(num_workers, math.ceil(len(documents) / batch_size))
    return documents.map(
        tokenize_into_examples if electra else tokenize_into_blocks,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        with_indices=electra,
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        features=datasets.Features(columns),
        num_proc=workers if workers > 1 else None,
        cache_file_name=str(scratch / f"examples-{example_format}.arrow"),
        desc=f"Tokenizing documents into {example_format} examples",
    )


def split_statistics(examples: Any, document_format: str, seconds: float) -> dict[str, Any]:
    """data_stats.json's entry for one split, from the examples' count columns."""
    import pyarrow.compute as pc

    counts = {name: int(pc.sum(examples.data.column(name)).as_py() or 0) for name in COUNT_COLUMNS}
    return {
        **counts,
        "examples": len(examples),
        "kept_fraction": round(counts["tokens_in_examples"] / counts["tokens"], 6)
        if counts["tokens"]
        else 0.0,
        "document_format": document_format,
        "segmenter": SEGMENTER,
        "segmenter_version": segmenter_version(),
        "preprocessing_seconds": round(seconds, 3),
    }


def build_split(
    args: argparse.Namespace,
    tokenizer: Any,
    source: dict[str, Any],
    split: str,
    raw: tuple[Any, str],
    scratch: Path,
) -> tuple[Any, dict[str, Any]]:
    """One split's examples (count columns dropped) and its data_stats.json entry; logs the kept fraction."""
    start = time.perf_counter()
    scratch = scratch / split  # the splits' intermediate Arrow files must not share names
    scratch.mkdir()
    documents, document_format = split_documents(*raw, source, split, scratch)
    examples = build_blocks(
        documents,
        tokenizer,
        args.max_seq_length,
        args.preprocessing_num_workers,
        args.example_format,
        scratch,
    )
    stats = split_statistics(examples, document_format, time.perf_counter() - start)
    if args.example_format == "packed":
        stats["sentences"] = None  # packed blocks cut the document stream; no sentences
    if stats["examples"] == 0:
        raise InputError(
            f"the {split} corpus is smaller than one block of --max_seq_length {args.max_seq_length} "
            "tokens; give more text or a smaller --max_seq_length"
        )
    logger.info(
        "%s: %d documents, %s sentences, %d tokens -> %d %s examples keeping %.1f%% of the tokens (%.1f s)",
        split,
        stats["documents"],
        stats["sentences"],
        stats["tokens"],
        stats["examples"],
        args.example_format,
        100 * stats["kept_fraction"],
        stats["preprocessing_seconds"],
    )
    return examples.remove_columns(list(COUNT_COLUMNS)), stats


def build_cache(args: argparse.Namespace, tokenizer: Any, source: dict[str, Any], directory: Path) -> None:
    """Build every split's examples and save them, with data_stats.json, into `directory`."""
    import datasets

    raw = load_raw_splits(source, args.data_cache_dir)
    blocks = datasets.DatasetDict()
    stats: dict[str, Any] = {"example_format": args.example_format, "max_seq_length": args.max_seq_length}
    with tempfile.TemporaryDirectory(prefix="build-", dir=args.data_cache_dir) as scratch:
        for split, raw_split in raw.items():
            blocks[split], stats[split] = build_split(
                args, tokenizer, source, split, raw_split, Path(scratch)
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
            stats["validation"] = {"held_out_from": "train", "examples": len(blocks["validation"])}
            stats["train"]["examples_after_holdout"] = len(blocks["train"])
        blocks.save_to_disk(str(directory))
    (directory / DATA_STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")


def prepare_blocks(args: argparse.Namespace, tokenizer: Any, source: dict[str, Any]) -> dict[str, Any]:
    """Examples for the train and validation splits, from the on-disk cache when it matches.

    Returns `{split: {"input_ids": MappedColumn [N, max_seq_length] int32, "token_type_ids": ... (electra
    format)}, "data_stats": data_stats.json's content}`. The cache key covers the data (Hub id/config, or
    each file's path, size and mtime; the document format), the tokenizer (its full serialized vocabulary
    and normalizer), the segmenter's version, `max_seq_length` and `example_format`.
    """
    import datasets

    key = cache_key(
        source,
        tokenizer.backend_tokenizer.to_str(),
        args.max_seq_length,
        args.example_format,
        f"{SEGMENTER}-{segmenter_version()}",
    )
    cache_path = Path(args.data_cache_dir) / f"blocks-{key}"
    if (cache_path / "dataset_dict.json").is_file():
        logger.info("Reusing tokenized data cache %s", cache_path)
    else:
        write_atomically(cache_path, lambda tmp: build_cache(args, tokenizer, source, tmp))
        logger.info("Wrote tokenized data cache %s", cache_path)
    cached = datasets.load_from_disk(str(cache_path))
    stats = json.loads((cache_path / DATA_STATS_FILE).read_text())
    logger.info("data_stats.json: %s", cache_path / DATA_STATS_FILE)
    columns = {split: mapped_columns(cached[split], args.max_seq_length) for split in ("train", "validation")}
    return {**columns, "data_stats": stats}


class MappedColumn:
    """A fixed-length integer column of the cached examples, read in place from the memory-mapped Arrow
    files: `[N, width]` to its users (`len`, `shape`, `column[indices]`, `column[a:b]`), with no copy of the
    corpus per process. Indexing gathers the rows, chunk by chunk, into a fresh array (the batch)."""

    def __init__(self, column: Any, width: int) -> None:
        self.column = column  # a pyarrow ChunkedArray of fixed-size lists
        self.width = width
        self.chunks = [
            chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)
            for chunk in column.chunks
            if len(chunk)
        ]
        self.offsets = np.cumsum([0, *(len(chunk) for chunk in self.chunks)])
        self.dtype = self.chunks[0].dtype if self.chunks else np.dtype(np.int32)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.width)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return MappedColumn(self.column.slice(start, max(0, stop - start)), self.width)
        indices = np.asarray(key)
        scalar = indices.ndim == 0
        indices = np.atleast_1d(indices)
        indices = np.where(indices < 0, indices + len(self), indices)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} examples")
        chunk_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.width), dtype=self.dtype)
        for chunk in np.unique(chunk_of):
            where = chunk_of == chunk
            out[where] = self.chunks[chunk][indices[where] - self.offsets[chunk]]
        return out[0] if scalar else out

    def __iter__(self):
        for chunk in self.chunks:
            yield from chunk

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = np.concatenate(self.chunks) if self.chunks else np.empty((0, self.width), self.dtype)
        return array if dtype is None else array.astype(dtype)


def mapped_columns(dataset: Any, width: int) -> dict[str, MappedColumn]:
    """Each fixed-length column of a dataset loaded with `load_from_disk` (memory-mapped), read in place."""
    if dataset._indices is not None:  # save_to_disk writes the rows themselves; guard against a mapping
        dataset = dataset.flatten_indices()
    return {name: MappedColumn(dataset.data.column(name), width) for name in dataset.column_names}


def batch_tensors(blocks: dict[str, MappedColumn], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The examples at `indices` as int64 tensors, keyed as the model's forward takes them."""
    return {name: torch.as_tensor(array[indices], dtype=torch.long) for name, array in blocks.items()}


def num_examples(blocks: dict[str, MappedColumn]) -> int:
    return len(blocks["input_ids"])


def load_tokenizer(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    """The pretrained fast tokenizer, or a WordPiece vocabulary trained (once, then cached) on the train split."""
    from transformers import AutoTokenizer

    name = args.tokenizer_name
    if args.train_tokenizer is not None:
        path = Path(args.data_cache_dir) / f"tokenizer-{cache_key(source, args.train_tokenizer)}"
        if not (path / "vocab.txt").is_file():
            raw = load_raw_splits(source, args.data_cache_dir)
            with tempfile.TemporaryDirectory(prefix="build-", dir=args.data_cache_dir) as scratch:
                documents, _ = split_documents(*raw["train"], source, "train", Path(scratch))
                texts = iter_column(documents, "text")
                write_atomically(path, lambda tmp: train_wordpiece(texts, args.train_tokenizer, tmp))
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


def train_wordpiece(documents: Iterable[str], vocab_size: int, directory: Path) -> None:
    """Train an uncased BERT-style WordPiece vocabulary and save it loadable by `AutoTokenizer`."""
    from tokenizers import BertWordPieceTokenizer

    directory.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        documents, vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS, show_progress=False
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


@dataclass
class PretrainingData:
    tokenizer: Any
    train_blocks: dict[str, MappedColumn]  # input_ids (and token_type_ids), [examples, max_seq_length]
    valid_blocks: dict[str, MappedColumn]
    steps_per_epoch: int
    micro_batches_per_epoch: int  # per process
    total_steps: int
    data_stats: dict[str, Any] = field(default_factory=dict)  # data_stats.json, copied into the run folder


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
        data_stats=blocks["data_stats"],
    )
