"""Recipe pieces beyond the plain loop: MixUp/CutMix of training batches and an EMA of the weights.

Both come from the libraries (``torchvision.transforms.v2.MixUp``/``CutMix`` on whole batches,
``torch.optim.swa_utils.AveragedModel``); what is ours is only the EMA's warm-up: the decay grows as
``(1 + n) / (10 + n)`` up to the configured value, so a short run's average is not dominated by its random
start. The decay is computed on the device from the average's own counter: no host sync per step.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
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


def _warmup_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # BatchNorm's batch counters: follow the model
            torch._foreach_copy_(averaged, current)
            return
        n = n.to(averaged[0].dtype)
        keep = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_lerp_(averaged, current, 1 - keep)

    return update


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA of ``model``'s parameters and buffers with decay ``decay`` (warmed up), or None when 0."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=_warmup_ema(decay), use_buffers=True)
