"""Recipe pieces beyond the plain loop: MixUp/CutMix of training batches (and a loss that weighs their soft
targets as it weighs hard labels) and an EMA of the weights.

Both come from the libraries (``torchvision.transforms.v2.MixUp``/``CutMix`` on whole batches,
``torch.optim.swa_utils.AveragedModel``); what is ours is only the EMA's warm-up: the decay grows as
``(1 + n) / (10 + n)`` up to the configured value, so a short run's average is not dominated by its random
start. The counter is read on the host (it lives there) and the decay passed as a number: no host sync per step.
"""
from __future__ import annotations

from itertools import chain
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from train.config import StageConfig

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(stage: StageConfig, num_classes: int) -> Mixer | None:
    """``(images, labels) -> (mixed images, soft labels)`` for ``stage.mix``, or None when off."""
    if stage.mix == "none":
        return None
    mixup = v2.MixUp(alpha=stage.mix_alpha, num_classes=num_classes)
    cutmix = v2.CutMix(alpha=stage.mix_alpha, num_classes=num_classes)
    return {"mixup": mixup, "cutmix": cutmix, "both": v2.RandomChoice([mixup, cutmix])}[stage.mix]


def training_loss(weight: torch.Tensor | None, label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                torch.Tensor]:
    """Cross-entropy over hard labels or MixUp/CutMix soft targets, normalised alike: by the summed class weights
    of the batch's targets. (``nn.CrossEntropyLoss`` divides a weighted loss of soft targets by the batch size
    instead, which shrinks it by the batch's mean class weight: a silently lower learning rate.)"""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not targets.is_floating_point():
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
        total = F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing, reduction="sum")
        # an element-wise product, not a matmul: autocast would run a matmul in bf16
        return total / (targets.sum() if weight is None else (targets * weight).sum())

    return loss


class WarmedUpEMA(AveragedModel):
    """``AveragedModel`` whose decay grows as ``(1 + n) / (10 + n)`` up to ``decay``. Its counter ``n_averaged``
    stays on the CPU and is read there, and the decay reaches the device as a Python number, so an update never
    waits for the device (``AveragedModel.update_parameters`` copies the counter to the device every call)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = list(zip(chain(self.module.parameters(), self.module.buffers()),
                         chain(model.parameters(), model.buffers())))
        floats = [(a, c.detach()) for a, c in pairs if a.is_floating_point()]
        counters = [(a, c.detach()) for a, c in pairs if not a.is_floating_point()]  # BatchNorm's batch counts
        n = int(self.n_averaged)
        if n == 0:
            floats, counters = [], floats + counters  # the first update copies the model
        if floats:
            keep = min((1 + n) / (10 + n), self.decay)
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - keep)
        if counters:
            torch._foreach_copy_([a for a, _ in counters], [c for _, c in counters])
        self.n_averaged += 1


def weight_average(model: nn.Module, decay: float) -> WarmedUpEMA | None:
    """An EMA of ``model``'s parameters and buffers with decay ``decay`` (warmed up), or None when 0."""
    if decay <= 0:
        return None
    return WarmedUpEMA(model, decay)
