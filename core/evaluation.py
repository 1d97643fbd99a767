"""Per-class evaluation: confusion matrix, per-class and balanced accuracy, most-confused pairs.

The trainer, ``python -m train eval`` and the app's Classes page share these functions. A
*class result* (``class_result``) is the plain dict the run store keeps for every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn


def confusion_matrix(targets: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """Counts as an int64 ``num_classes x num_classes`` matrix: rows = true class, columns = predicted."""
    t = np.asarray(targets, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError("targets and predictions must have the same length")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Recall of every class (correct / samples); None for a class without samples."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    return [float(confusion[i, i] / n) if n else None for i, n in enumerate(totals)]


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean per-class accuracy over the classes that have samples (0.0 when none do)."""
    accs = [a for a in per_class_accuracy(confusion) if a is not None]
    return float(np.mean(accs)) if accs else 0.0


def accuracy(confusion: np.ndarray) -> float:
    confusion = np.asarray(confusion)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def per_class_precision(confusion: np.ndarray) -> list[float | None]:
    """Correct / predicted as the class; None for a class never predicted."""
    confusion = np.asarray(confusion)
    predicted = confusion.sum(axis=0)
    return [float(confusion[i, i] / n) if n else None for i, n in enumerate(predicted)]


def per_class_f1(precision: Sequence[float | None], recall: Sequence[float | None]) -> list[float | None]:
    """Harmonic mean of precision and recall per class, i.e. 2TP / (2TP + FP + FN): 0 for a class never predicted
    or without images (its TP is 0 then), None only for a class neither predicted nor present."""
    out: list[float | None] = []
    for p, r in zip(precision, recall):
        if p is None or r is None:
            out.append(None if p is None and r is None else 0.0)
        else:
            out.append(2 * p * r / (p + r) if p + r else 0.0)
    return out


def confused_pairs(confusion: np.ndarray, classes: Sequence[str], top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` off-diagonal cells, largest first: true, predicted, count and rate (of the true class)."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), confusion.shape[1])
        if off[i, j] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                      "rate": float(off[i, j] / totals[i])})
    return pairs


def class_result(classes: Sequence[str], confusion: np.ndarray, train_counts: Sequence[int] | None = None,
                 top5_acc: float | None = None) -> dict[str, Any]:
    """The per-class record the run store keeps (JSON-ready): counts, recall (``per_class_acc``), precision,
    F1, the confusion matrix, accuracy, balanced accuracy and, when given, top-5 accuracy (None with 5 classes or
    fewer, where every class is in the top 5)."""
    confusion = np.asarray(confusion)
    recall, precision = per_class_accuracy(confusion), per_class_precision(confusion)
    return {
        "classes": list(classes),
        "train_counts": [int(c) for c in train_counts] if train_counts is not None else None,
        "val_counts": [int(c) for c in confusion.sum(axis=1)],
        "correct": [int(c) for c in np.diag(confusion)],
        "per_class_acc": recall,
        "precision": precision,
        "f1": per_class_f1(precision, recall),
        "confusion": confusion.astype(int).tolist(),
        "accuracy": accuracy(confusion),
        "balanced_acc": balanced_accuracy(confusion),
        "top5_acc": top5_acc if len(classes) > 5 else None,
    }


@dataclass
class Predictions:
    """Everything one pass over a data set produced, in data set order."""

    targets: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    loss: float
    in_top5: np.ndarray | None = None  # whether the true class is among the 5 most likely (all of them if fewer)
    # the out-of-distribution scores (core.ood) of the plain view, as Explain scores one image: with test-time flips
    # the averaged logits would set thresholds that single views do not reach
    logsumexp: np.ndarray = field(default_factory=lambda: np.zeros(0))  # negative energy
    view_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))  # maximum softmax probability

    def confusion(self, num_classes: int) -> np.ndarray:
        return confusion_matrix(self.targets, self.predicted, num_classes)

    @property
    def top5_accuracy(self) -> float | None:
        return float(self.in_top5.mean()) if self.in_top5 is not None and len(self.in_top5) else None


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device | str = "cpu",
            criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
            autocast_dtype: torch.dtype | None = None, flip: bool = False) -> Predictions:
    """Run ``model`` (eval mode) over ``loader`` (not shuffled); ``prepare`` maps a batch to model input.

    ``flip``: test-time augmentation, the logits of each image averaged with those of its mirror image.
    """
    model.eval()
    device = torch.device(device)
    criterion = criterion or nn.CrossEntropyLoss()
    targets, predicted, confidence, top5, logsumexp, view_confidence, losses = [], [], [], [], [], [], []
    for images, labels in loader:  # everything stays on the device until the end: no wait per batch
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            view = model(images).float()
            logits = (view + model(images.flip(3)).float()) / 2 if flip else view
        logsumexp.append(view.logsumexp(dim=1))
        view_confidence.append(view.softmax(dim=1).amax(dim=1))
        losses.append(criterion(logits, labels).double() * len(labels))
        conf, pred = logits.softmax(dim=1).max(dim=1)
        top5.append((logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]).any(dim=1))
        targets.append(labels)
        predicted.append(pred)
        confidence.append(conf)
    n = sum(len(t) for t in targets)
    if not n:
        empty = np.zeros(0)
        return Predictions(empty.astype(np.int64), empty.astype(np.int64), empty, float("nan"),
                           empty.astype(bool), empty, empty)

    def host(parts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(parts).cpu().numpy()

    return Predictions(host(targets).astype(np.int64), host(predicted).astype(np.int64),
                       host(confidence).astype(np.float64), float(torch.stack(losses).sum()) / n,
                       host(top5).astype(bool), host(logsumexp).astype(np.float64),
                       host(view_confidence).astype(np.float64))


def misclassified(predictions: Predictions, classes: Sequence[str], source: Callable[[int], str],
                  limit: int = 200) -> list[dict[str, Any]]:
    """The wrong predictions, most confident first (at most ``limit``), with each image's source string."""
    wrong = np.flatnonzero(predictions.predicted != predictions.targets)
    wrong = wrong[np.argsort(-predictions.confidence[wrong], kind="stable")][:limit]
    return [{"source": source(int(i)), "true": classes[predictions.targets[i]],
             "predicted": classes[predictions.predicted[i]], "confidence": float(predictions.confidence[i])}
            for i in wrong]
