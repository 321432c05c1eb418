"""One writer per run folder: an exclusive `fcntl.flock` on a lock file beside the folder.

A pretraining run (`<model_save_directory>/<model_save_name>`) and each GLUE (task, seed) cell
(`<output_dir>/<model>/<task>/seed_<seed>`) is written by one process at a time. The lock is taken before the
folder is checked or touched and held until the process ends; a second process is refused with an
`InputError` (one line, exit status 2) naming the holder's PID. The operating system drops a `flock` when
its process dies, so a killed run (SIGKILL included) never blocks its resume.

The lock file is `.<folder name>.lock` in the folder's parent (the folder itself may not exist yet, and a
finished GLUE cell is replaced whole). It holds the holder's PID and is deleted on release; one a killed
holder left behind is simply locked again.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from input_checks import InputError, check_writable

# A holder writes its PID just after it takes the lock; a refused process waits this long to read it.
PID_WAIT_S = 1.0


def lock_path(folder: Path) -> Path:
    """Where the lock of `folder` lives: `.<name>.lock` beside it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain single process): the one that locks."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_lock(folder: Path, parent_flag: str, what: str) -> Iterator[None]:
    """Hold the exclusive lock of `folder` for the `with` block; refused (InputError) while another process
    holds it. `parent_flag` names the flag of the folder's parent, `what` the flags that chose `folder`.

    Folders made to hold the lock file are removed again if they are still empty at the end (a run refused
    for bad input leaves nothing behind)."""
    path = lock_path(folder)
    check_writable(path.parent, parent_flag)
    made = [p for p in [path.parent, *path.parent.absolute().parents] if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = acquire(path, what)
    try:
        yield
    finally:
        release(path, fd)
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def acquire(path: Path, what: str) -> int:
    """Open and lock `path`, retrying when the file was deleted by its previous holder in between."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{path.parent / path.name[1:].removesuffix('.lock')} is in use by process {holder(path)} "
                f"(lock {path}); wait for it to finish, or choose another {what}"
            ) from None
        if same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # locked a file its holder had just deleted: lock the new one


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def holder(path: Path) -> str:
    """The PID written in the lock file (its holder may not have written it yet: wait a moment)."""
    deadline = time.monotonic() + PID_WAIT_S
    while True:
        try:
            pid = path.read_text().strip()
        except OSError:
            pid = ""
        if pid or time.monotonic() > deadline:
            return pid or "(unknown PID)"
        time.sleep(0.05)


def release(path: Path, fd: int) -> None:
    """Delete the lock file while still holding it, then drop the lock."""
    try:
        if same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)
