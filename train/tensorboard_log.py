"""TensorBoard event files for every run, when the ``tensorboard`` package is installed (optional).

Written under ``<run dir>/tensorboard`` so ``tensorboard --logdir checkpoints/runs`` shows every run next to the
app: ``step/train_loss`` and ``step/lr`` per optimizer step (the pipeline's global step), ``epoch/*`` (losses,
accuracies, lr, throughput) per epoch (counted over the whole pipeline), ``confusion/<stage>`` (the
row-normalised validation confusion matrix as an image) and each stage's hyperparameters with its best
validation accuracy (the HPARAMS tab). Without tensorboard every call does nothing, so training never needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CELL_PX = 12  # pixels per confusion-matrix cell (at most 768 px per side)


def confusion_image(confusion: np.ndarray) -> np.ndarray:
    """The confusion matrix, each row divided by its total, as an RGB uint8 image [H, W, 3] (viridis)."""
    from core.overlay import colorize

    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    cell = max(1, min(CELL_PX, 768 // max(1, len(matrix))))
    return np.kron(colorize(rates, "viridis"), np.ones((cell, cell, 1), dtype=np.uint8))


class TensorBoardLog:
    """A ``SummaryWriter`` for one run, or nothing at all (``folder`` None, or tensorboard missing)."""

    def __init__(self, folder: Path | None, purge_step: int | None = None) -> None:
        self.writer: Any = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/train_loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, epoch: int, metrics: dict[str, Any], stage: str, confusion: np.ndarray | None) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if confusion is not None:
            self.writer.add_image(f"confusion/{stage}", confusion_image(confusion), epoch, dataformats="HWC")
        self.writer.flush()

    def hparams(self, stage: str, config: dict[str, Any], best_score: float | None) -> None:
        """The stage's hyperparameters with its best value of the metric its ``select`` names."""
        if self.writer is None:
            return
        plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()
                 if v is not None}
        self.writer.add_hparams(plain, {"hparam/best_score": best_score if best_score is not None else 0.0},
                                run_name=stage)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
