"""`python -m train cache [--clear]`: the image cache on disk, listed, and cleared when asked.

Every split a run trains or evaluates on is decoded once into ``<RESLENS_HOME>/cache/images`` (see
``train/image_cache.py``); each data set, split and size gets its own file, and nothing removes them. This lists them
(what each holds, its size, when a run last used it) and deletes them, all or those unused for some days. Runs
training on a cache keep their memory maps and finish; a later run builds the file again.
"""
from __future__ import annotations

import argparse
import time

from core.errors import UserError
from core.sizes import iec_bytes
from train.image_cache import (CacheEntry, cache_dir, cache_entries, remove_cache, swept_sentence,
                               sweep_stale_builds)

DAY_S = 86_400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clear", action="store_true", help="delete the cached splits (all, or see --unused-days)")
    parser.add_argument("--unused-days", type=float, metavar="DAYS",
                        help="with --clear: only those no run has used for this many days")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def unused_for(entries: list[CacheEntry], days: float | None, now: float | None = None) -> list[CacheEntry]:
    """The entries no run has used for ``days`` (all of them when ``days`` is None)."""
    if days is None:
        return list(entries)
    if not days >= 0:  # NaN too
        raise UserError(f"--unused-days must be 0 or more, not {days:g}.")
    now = time.time() if now is None else now
    return [e for e in entries if now - e.last_used >= days * DAY_S]


def entry_line(entry: CacheEntry) -> str:
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    return f"{used}  {iec_bytes(entry.size):>10}  {entry.what}"


def run(args: argparse.Namespace) -> int:
    """List the image cache (what, size, last use); --clear deletes it, or the part unused for some days. Partial
    files of builds whose process died go first."""
    if args.unused_days is not None and not args.clear:
        raise UserError("--unused-days only applies with --clear.")
    swept = sweep_stale_builds()
    if swept:
        print(swept_sentence(swept))
    entries = cache_entries()
    if not args.clear:
        print(f"Image cache in {cache_dir()}: {len(entries)} cached splits, "
              f"{iec_bytes(sum(e.size for e in entries))}.")
        for entry in entries:
            print(entry_line(entry))
        return 0
    from train.commands import confirmed

    doomed = unused_for(entries, args.unused_days)
    if not doomed:
        print("Nothing to clear.")
        return 0
    question = f"Delete {len(doomed)} cached splits ({iec_bytes(sum(e.size for e in doomed))})?"
    if not args.yes and not confirmed(question, "Clearing the image cache"):
        print("Nothing deleted.")
        return 1
    freed = sum(remove_cache(entry) for entry in doomed)
    print(f"Deleted {len(doomed)} cached splits; freed {iec_bytes(freed)}. Runs build them again when they need them.")
    return 0


COMMANDS = {"cache": (add_arguments, run)}
