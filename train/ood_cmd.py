"""`python -m train ood-thresholds CHECKPOINT`: add out-of-distribution thresholds to a checkpoint.

The trainer stores them with every checkpoint it writes (see core/ood.py); this computes them for older ones
on the validation split of the data set the checkpoint was trained on, and rewrites the file atomically.
"""
from __future__ import annotations

import argparse
import os
import stat
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from core import ood, paths
from core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from core.run_store import RunStoreError
from train.cli import folder
from train.trainer_lock import trainer_lock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a ResLens checkpoint (.pt); rewritten in place")
    parser.add_argument("--dataset", help="data set name (default: the one the checkpoint was trained on)")
    parser.add_argument("--root", type=folder, help="data set root (default: the training root, or the data root)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--batch-size", type=int, default=64)


def add_ood_thresholds(path: str | os.PathLike[str], dataset: str | None = None, root: str | None = None,
                       device: str | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Compute the thresholds on the validation split and store them in the checkpoint; returns them."""
    from train.engine import evaluate_checkpoint

    if Path(path).is_file() and not Path(path).stat().st_mode & stat.S_IWUSR:
        raise CheckpointError(f"{path} is read-only, so its thresholds cannot be stored in it; copy it, or make it "
                              "writable (chmod u+w) if it may be changed.")
    with _no_trainer(path):
        before = _version(path)
        found = evaluate_checkpoint(path, dataset, root, "val", device, batch_size)
        preds = found.predictions
        stats = ood.calibrate(preds.view_confidence, preds.logsumexp) if preds is not None else {}
        if not stats:
            raise CheckpointError(f"The validation split of {found.dataset} has no images, so {path} gets no "
                                  "thresholds.")
        checkpoint = load_checkpoint(path)
        if _version(path) != before:  # rewritten meanwhile: these thresholds are of the weights it replaced
            raise CheckpointError(f"{path} was rewritten while its thresholds were computed (is its run "
                                  "training?); it is left as it was written. Run this again once the run has stopped.")
        save_checkpoint(path, {**checkpoint, "ood": stats})
    return stats


@contextmanager
def _no_trainer(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the trainer lock of the run whose folder holds ``path`` (a checkpoint elsewhere has no trainer), so no
    trainer rewrites it between the evaluation and the save; refuse one whose run is training."""
    try:
        run: str | None = Path(path).resolve().relative_to(paths.runs_dir().resolve()).parts[0]
        folder = paths.run_dir(run)  # ValueError: not a run's name
    except (ValueError, IndexError):
        run = None
    with ExitStack() as held:
        if run is not None and folder.is_dir():
            try:
                held.enter_context(trainer_lock(run))
            except RunStoreError:
                raise CheckpointError(f"{path} belongs to run {run}, which is training right now; add its "
                                      "thresholds once it has stopped.") from None
        yield


def _version(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """Which file ``path`` is now (a checkpoint is replaced whole, a new inode); None when there is none (the
    evaluation says so)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def run(args: argparse.Namespace) -> int:
    """Add out-of-distribution thresholds (from the validation set) to an older checkpoint."""
    stats = add_ood_thresholds(args.checkpoint, args.dataset, args.root, args.device, args.batch_size)
    print(f"{args.checkpoint}: {stats['val_images']} validation images; {stats['keep']:.0%} of them have "
          f"confidence >= {stats['msp_threshold']:.4f} and energy score >= {stats['energy_threshold']:.4f}")
    return 0


COMMANDS = {"ood-thresholds": (add_arguments, run)}
