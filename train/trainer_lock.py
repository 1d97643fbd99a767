"""One trainer per run: the trainer holds an exclusive lock on ``<run dir>/.trainer.lock`` while it trains.

The store's recorded pid says which process trains a run, but two ``resume`` commands started together both read
it before either writes its own; the lock is taken atomically, so the second is refused. It is a POSIX record
lock (``lockf``): it belongs to the process, so forked DataLoader workers do not inherit it, and the kernel drops
it when the process exits in any way (``kill -9`` too): a dead trainer never blocks a resume. (Such a lock also
goes when the process closes any descriptor of the file: nothing else in a trainer opens it; ``trainer_lock_held``
opens it only in other processes, to see whether a trainer still holds the run.)
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

from core import paths
from core.run_store import RunStoreError

LOCK_NAME = ".trainer.lock"


@contextmanager
def trainer_lock(run_name: str) -> Iterator[None]:
    """Hold run ``run_name``'s trainer lock; ``RunStoreError`` at once when another live process holds it."""
    folder = paths.run_dir(run_name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            raise RunStoreError(f"Run {run_name!r} is being trained by another process right now (two resumes "
                                "at once?); this one leaves it to that one.") from None
        yield


def trainer_lock_held(run_name: str) -> bool:
    """Whether a process holds run ``run_name``'s trainer lock now (tested by taking a shared lock for a moment;
    never call it from a process that holds the lock: closing the file would drop it)."""
    try:
        fd = os.open(paths.run_dir(run_name) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # EACCES or EAGAIN: a trainer holds it
        return True
    finally:
        os.close(fd)
    return False
