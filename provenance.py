"""provenance.json: which code and libraries produced a run folder (pretraining and GLUE runs alike).

    {"git_commit": "ee4cbcd...", "git_dirty": false, "command": ["run_glue.py", "--task_name", "rte", ...],
     "python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0", "datasets": "5.2.0",
     "accelerate": "1.15.0", "created": "2026-12-07T18:40:00+00:00"}

The commit is the repository's that holds this file (None, with `git_dirty` None, outside a git checkout or
without git); `git_dirty` is true when tracked files differ from that commit.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from outputs import write_json_atomically

PROVENANCE_FILE = "provenance.json"
REPO_DIR = Path(__file__).resolve().parent
LIBRARIES = ("torch", "transformers", "datasets", "accelerate")


def git_output(*args: str) -> str | None:
    """stdout of `git args` run in this repository, or None when git or the repository is not there."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def library_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance_record(argv: list[str] | None = None) -> dict[str, Any]:
    """The commit, dirty flag, command line and library versions of this process."""
    commit = git_output("rev-parse", "HEAD")
    status = git_output("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "command": list(sys.argv if argv is None else argv),
        "python": platform.python_version(),
        **{name: library_version(name) for name in LIBRARIES},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_provenance(directory: Path, argv: list[str] | None = None) -> dict[str, Any]:
    """Write `<directory>/provenance.json` atomically; returns what it wrote."""
    record = provenance_record(argv)
    write_json_atomically(Path(directory) / PROVENANCE_FILE, record, indent=2)
    return record
