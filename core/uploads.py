"""The image sets unpacked from uploaded zips (``core.image_zip``): list them with their size and the runs
trained on them, and delete one, never while a queued or running run reads it."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import paths
from core.errors import UserError
from core.image_zip import MARKER
from core.run_store import ACTIVE_STATES, RunStore
from core.sizes import folder_bytes


class UploadInUse(UserError):
    """An unpacked upload that a queued or running run reads."""


@dataclass(frozen=True)
class UploadedSet:
    """One unpacked upload: ``target`` is the folder it was unpacked into (its name comes from the zip's)."""

    target: Path
    images: int
    bytes: int
    unpacked: float  # when, as a timestamp
    runs: tuple[str, ...]  # runs with a stage reading it, in the store's order
    active: tuple[str, ...]  # those of them queued or running


def uploaded_sets(store: RunStore, parent: str | os.PathLike[str] | None = None) -> list[UploadedSet]:
    """Every unpacked upload under ``parent`` (default: the uploads folder), newest first."""
    parent = Path(parent) if parent is not None else paths.uploads_dir()
    found, all_runs = [], store.list_runs()
    for marker in parent.glob(f"*/{MARKER}"):
        try:
            images = int(json.loads(marker.read_text())["images"])
            unpacked = marker.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a marker someone edited or half-deleted folder: not listed, never deleted from here
        runs = _runs_reading(all_runs, marker.parent)
        found.append(UploadedSet(marker.parent, images, folder_bytes(marker.parent), unpacked,
                                 tuple(runs), tuple(name for name, state in runs.items() if state in ACTIVE_STATES)))
    return sorted(found, key=lambda s: s.unpacked, reverse=True)


def delete_uploaded(upload: UploadedSet, store: RunStore) -> None:
    """Delete an unpacked upload's folder; ``UploadInUse`` (nothing deleted) while a run still reads it."""
    reading = _runs_reading(store.list_runs(), upload.target)  # read now: a run may have started since the list
    active = [name for name, state in reading.items() if state in ACTIVE_STATES]
    if active:
        raise UploadInUse(f"{upload.target.name} is being read by run {active[0]} ({len(active)} run(s) queued or "
                          "running): stop it first, or wait until it ends.")
    if not upload.target.exists():
        return  # deleted already (another tab)
    if not (upload.target / MARKER).is_file():
        raise UserError(f"{upload.target} is not an unpacked upload (it has no {MARKER}): nothing was deleted.")
    try:
        shutil.rmtree(upload.target)
    except OSError as exc:
        raise UserError(f"{upload.target} could not be deleted in full ({exc.strerror or exc}: "
                        f"{exc.filename or upload.target}).") from None


def _runs_reading(runs: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """Run name -> state, of the ``runs`` (the store's list) with a stage whose root is ``folder`` or inside it."""
    inside, folder = {}, folder.resolve()
    for run in runs:
        roots = [s.get("root") for s in run["config"].get("stages") or [] if isinstance(s, dict)]
        if any(isinstance(r, str) and Path(r).resolve().is_relative_to(folder) for r in roots):
            inside[run["name"]] = run["state"]
    return inside
