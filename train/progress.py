"""Training progress and ETA, shared by the loop, the heartbeat thread and the display.

The ETA comes from a smoothed time per optimizer step of the running stage (an exponential moving
average of step durations; the first step of every epoch, which waits for the data loader, and the
validation passes are timed apart). It counts the work left: the running stage's steps and
validations, then every later stage's steps, each scaled by its pixels per step (batch size x image
size squared) relative to the running stage. Until ``STEADY_STEPS`` steps of the running stage have
been timed the ETA is None, which people read as "estimating...".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

STEADY_STEPS = 5
SMOOTHING = 0.1  # weight of the newest step in the moving average


@dataclass
class StageWork:
    """What one stage has to do: optimizer steps in all, epochs, and the pixels one step processes (on average;
    ``epoch_pixels``: per epoch, when a resolution schedule changes it)."""

    steps: int
    epochs: int
    pixels_per_step: float
    val_images: int = 0
    train_images: int = 0
    epoch_pixels: tuple[float, ...] = ()

    def pixels_at(self, epoch: int) -> float:
        """Pixels per step of ``epoch`` (from 1)."""
        if not self.epoch_pixels:
            return self.pixels_per_step
        return self.epoch_pixels[max(1, min(epoch, len(self.epoch_pixels))) - 1]

    def steps_ahead(self, epoch: int, left: int) -> float:
        """The ``left`` steps of the stage from within ``epoch``, in steps of that epoch's size."""
        if not self.epoch_pixels:
            return float(left)
        per_epoch = self.steps / self.epochs
        later = range(epoch + 1, self.epochs + 1)
        this_epoch = max(0.0, left - per_epoch * len(later))
        return this_epoch + sum(per_epoch * self.pixels_at(e) / self.pixels_at(epoch) for e in later)


@dataclass
class Progress:
    """Where the run is and how long it will take (``eta_s`` pipeline, ``stage_eta_s`` running stage)."""

    stage: int = 0
    epoch: int = 0
    step: int = 0
    done_steps: int = 0
    total_steps: int = 0
    images_per_s: float | None = None
    eta_s: float | None = None
    stage_eta_s: float | None = None
    phase: str | None = None  # "compiling" while a freshly compiled model runs its first step
    plan: list[StageWork] = field(default_factory=list)
    _step_s: float | None = None
    _timed: int = 0
    _timed_stage: int | None = None
    _last: float | None = None
    _val_s: float | None = None

    def set_plan(self, plan: list[StageWork], done_steps: int) -> None:
        self.plan, self.done_steps = plan, done_steps
        self.total_steps = sum(w.steps for w in plan)

    def start_epoch(self, stage: int, epoch: int, step: int, retime: bool = False) -> None:
        """An epoch (or its resumed rest) begins: its first step is not timed (the loader starts up). ``retime``:
        its steps cost differently from the last epoch's (layers unfrozen), so their time is measured anew."""
        if stage != self._timed_stage:
            self._step_s, self._timed, self._timed_stage, self._val_s = None, 0, stage, None
        elif retime:
            self._step_s, self._timed = None, 0
        elif self._step_s is not None and stage < len(self.plan):  # a resolution schedule's new size
            work = self.plan[stage]
            self._step_s *= work.pixels_at(epoch) / work.pixels_at(self.epoch)
        self.stage, self.epoch, self.step = stage, epoch, step
        self._last = None
        self._update_eta()

    def advance(self, images: int, step: int | None = None) -> None:
        """One optimizer step of ``images`` images has finished."""
        now = time.monotonic()
        self.done_steps += 1
        self.phase = None
        if step is not None:
            self.step = step
        if self._last is not None:
            seconds = now - self._last
            self._step_s = seconds if self._step_s is None else (1 - SMOOTHING) * self._step_s + SMOOTHING * seconds
            self._timed += 1
            self.images_per_s = images / self._step_s if self._step_s > 0 else None
        self._last = now
        self._update_eta()

    def finish_stage(self, stage: int) -> None:
        """Stage ``stage`` is over (maybe early): count all its steps as done."""
        self.done_steps = max(self.done_steps, sum(w.steps for w in self.plan[: stage + 1]))

    def validated(self, seconds: float) -> None:
        """A validation pass of the running stage took ``seconds``."""
        self._val_s = seconds
        self._last = None

    def _update_eta(self) -> None:
        if self._timed < STEADY_STEPS or self._step_s is None or self.stage >= len(self.plan):
            self.eta_s = self.stage_eta_s = None
            return
        current = self.plan[self.stage]
        done_before = sum(w.steps for w in self.plan[: self.stage])
        left = max(0, current.steps - (self.done_steps - done_before))
        validations_left = max(0, current.epochs - max(1, self.epoch) + 1)  # this epoch's is still to come
        self.stage_eta_s = (current.steps_ahead(max(1, self.epoch), left) * self._step_s
                            + validations_left * self._validation_s(current))
        later = 0.0
        now = current.pixels_at(self.epoch)
        for work in self.plan[self.stage + 1:]:
            scale = work.pixels_per_step / now if now else 1.0
            later += work.steps * self._step_s * scale * (1 + self._val_share(work))
        self.eta_s = self.stage_eta_s + later

    def _validation_s(self, work: StageWork) -> float:
        """Measured, or estimated as forward passes at a third of a training step's cost per image."""
        if self._val_s is not None:
            return self._val_s
        return self._step_s * self._val_share(work) * work.steps / max(1, work.epochs)

    @staticmethod
    def _val_share(work: StageWork) -> float:
        return work.val_images / work.train_images / 3 if work.train_images else 0.0

    def fields(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "step": self.step, "done_steps": self.done_steps,
                "total_steps": self.total_steps, "images_per_s": self.images_per_s, "eta_s": self.eta_s,
                "stage_eta_s": self.stage_eta_s, "phase": self.phase,
                "stage_steps": self.plan[self.stage].steps if self.stage < len(self.plan) else None}


def gpu_usage(device: Any) -> list[dict[str, Any]] | None:
    """Memory (bytes) and, where NVML is installed, utilisation (%) of the training GPU; None off CUDA."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    entry: dict[str, Any] = {"index": index, "name": torch.cuda.get_device_name(index),
                             "memory_used": total - free, "memory_total": total,
                             "allocated": torch.cuda.memory_allocated(index)}
    try:
        entry["utilization"] = torch.cuda.utilization(index)  # needs the nvidia-ml-py package
    except Exception:  # noqa: BLE001 - no NVML here: memory only
        pass
    return [entry]
