"""How the project writes results: atomically (a crash never leaves half a file or folder) and as tables; and
how it reads back the JSON-lines files it appends to (one policy for a line cut short).

One place for these, so every script (pretraining, GLUE, gathering, benchmarks) and the notebook agree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from input_checks import InputError

logger = logging.getLogger(__name__)

TABLE_FORMATS = ("markdown", "latex")


def write_atomically(final: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Write a file or directory under a temporary sibling name, then rename it into place.

    `write(tmp)` creates `tmp`. A crash leaves no partial `final`. An existing file is replaced. An existing
    directory is replaced whole with `replace=True` (see `publish`); otherwise it is kept and the new copy
    discarded (another process finished the same content first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    remove(tmp)
    try:
        write(tmp)
        if final.is_dir() and not replace:
            remove(tmp)
        else:
            publish(tmp, final)
    except BaseException:
        remove(tmp)
        raise


def publish(tmp: Path, final: Path) -> None:
    """Move a finished file or directory `tmp` into place as `final`, replacing what is there whole.

    An existing directory is first renamed aside and deleted only once the new one is in place, so at
    every moment `final` is either the old or the new content, never a mixture.
    """
    old = None
    if final.is_dir() and not final.is_symlink():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        remove(old)
        final.rename(old)
    os.replace(tmp, final)
    if old is not None:
        remove(old)


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, payload: Any, **dump_kwargs: Any) -> None:
    """`json.dumps(payload, indent=2)` plus a newline, written atomically; extra kwargs go to `json.dumps`."""
    dump_kwargs.setdefault("indent", 2)
    write_text_atomically(path, json.dumps(payload, **dump_kwargs) + "\n")


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """`(line, record)` for each non-empty line of a JSON-lines file we append to (metrics.jsonl).

    The one policy for a line that is not JSON: the last line is a write cut short (a kill, or a run still
    writing), dropped with a warning; any other is an InputError naming it.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)))
        except ValueError as error:
            if number == len(lines):
                logger.warning("Dropping the incomplete last line of %s: %r", path, line[:80])
                break
            raise InputError(
                f"{path} line {number} is not valid JSON ({error}); fix or delete that line"
            ) from error
    return records


def render_table(frame: Any, fmt: str = "markdown", index: bool = False, floatfmt: str = "g") -> str:
    """A pandas DataFrame as a GitHub-markdown (via `tabulate`) or LaTeX (booktabs) table."""
    if fmt == "markdown":
        return frame.to_markdown(index=index, floatfmt=floatfmt)
    if fmt == "latex":
        float_format = (lambda v: format(v, floatfmt)) if floatfmt else None
        return frame.to_latex(index=index, float_format=float_format)
    raise ValueError(f"table format must be one of {TABLE_FORMATS}, got {fmt!r}")
