"""Checks of command-line input shared by the scripts, made before anything is loaded or written.

Bad input raises `InputError`; each script's `main()` prints it as one line naming the flag or path and
what to do, and exits with status 2 (as argparse does for a usage error). Any other error keeps its
traceback, so a bug stays visible.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2  # every script's status for bad input, as argparse's for a bad command line
# A pretraining run is finished once this model folder is in place (wikitext_trainer.py writes it last).
FINISHED_RUN_MODEL = "discriminator"
# What an electra_moe config.json must state (an older or hand-edited one may lack them).
STATED_MOE_FIELDS = ("num_experts", "top_k")
# What a local fast WordPiece tokenizer folder holds (ELECTRA's vocabulary is WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
UTF8_SNIFF_BYTES = 1 << 16  # the start of a data file that must decode as UTF-8
TOKENIZER_FIX = "pass a folder with a WordPiece vocab.txt, e.g. ../shared/data/electra-vocab"


class InputError(ValueError):
    """Bad data, tokenizer, model or output flags: reported as a one-line error, exit status 2."""


def looks_like_local_path(name: str) -> bool:
    """True for a name the Hub cannot take as a model id (`name` or `namespace/name`): absolute, relative
    to `.`, under `~`, or with more than one slash."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else the nearest folder above it that does."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


def holds_files(path: Path) -> bool:
    """True for a folder with anything in it: an output folder a new run would clobber."""
    return path.is_dir() and any(path.iterdir())


def finished_run_model(run_dir: Path) -> Path | None:
    """The discriminator/ of a finished pretraining run (written last, so it marks the run finished), or None."""
    model = Path(run_dir) / FINISHED_RUN_MODEL
    return model if (model / "config.json").is_file() else None


def unstated_moe_fields(config: dict[str, Any]) -> list[str]:
    """The MoE settings an electra_moe config.json lacks: each must be stated, not fall back to a default."""
    if config.get("model_type") != "electra_moe":
        return []
    return [key for key in STATED_MOE_FIELDS if key not in config]


def check_writable(path: Path, flag: str) -> None:
    """`path`, or the nearest folder above it that exists, must be a folder this process may write to."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} is read-only)"
        raise InputError(f"{flag} {path} is not writable{where}; pass a folder you can write to")


def check_tokenizer_path(name: str, flag: str = "--tokenizer_name", fix: str = TOKENIZER_FIX) -> None:
    """A local tokenizer folder must exist and hold a vocabulary; a name that is no path is left to the Hub."""
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_local_path(name):
            raise InputError(
                f"could not load tokenizer: {flag} {name} does not exist; pass a tokenizer folder or a Hub id"
            )
        return
    if not path.is_dir():
        raise InputError(f"{flag} {name} is a file; pass the folder that holds it")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{flag} {name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {fix}")


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
