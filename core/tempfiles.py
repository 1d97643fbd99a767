"""Temporary files that say whether someone still writes them: created locked, swept when stale.

A writer creates its temporary file with ``locked_temp`` and keeps the returned descriptor open until
the file is renamed into place or removed; the descriptor holds an exclusive ``flock``. The kernel drops
that lock when the writer exits in any way (SIGKILL, a closed terminal, a power cut is a reboot), so
``sweep_stale`` removes exactly the files that no live process owns: it takes the lock itself first.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


def locked_temp(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new empty file in ``folder``, with an open descriptor holding its exclusive lock."""
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # a sweeper may have removed it between mkstemp and flock
            return fd, Path(name)
        os.close(fd)


def sweep_stale(folder: Path, pattern: str, recursive: bool = False) -> list[Path]:
    """Remove the files matching ``pattern`` under ``folder`` whose writer is gone; return them."""
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if _remove_if_unowned(path):
            removed.append(path)
    return removed


def _remove_if_unowned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if not path.is_file() or path.is_symlink():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # locked: a live process still writes it
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
