"""train/progress.py: a smoothed per-stage ETA that counts later stages and says nothing until it is steady."""
from __future__ import annotations

import pytest
import torch

from train import progress as progress_module
from train.progress import STEADY_STEPS, Progress, StageWork, gpu_usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", c)
    return c


def steps(p: Progress, clock: Clock, seconds: list[float]) -> None:
    for s in seconds:
        clock.now += s
        p.advance(8)


def test_estimating_until_steady_and_a_slow_start_does_not_count(clock):
    p = Progress()
    p.set_plan([StageWork(steps=100, epochs=1, pixels_per_step=1.0)], done_steps=0)
    p.start_epoch(0, 1, 0)
    steps(p, clock, [60.0] + [1.0] * (STEADY_STEPS - 1))  # the first step waits for the loader: not timed
    assert p.eta_s is None and p.stage_eta_s is None and p.fields()["eta_s"] is None
    steps(p, clock, [1.0])
    assert p.eta_s == pytest.approx(100 - STEADY_STEPS - 1)


def test_fields_carry_the_running_stages_own_step_count(clock):
    p = Progress()
    p.set_plan([StageWork(10, 1, pixels_per_step=1.0), StageWork(20, 2, pixels_per_step=4.0)], done_steps=0)
    p.start_epoch(1, 1, 3)
    assert (p.fields()["step"], p.fields()["stage_steps"], p.fields()["total_steps"]) == (3, 20, 30)


def test_stage_eta_never_exceeds_the_pipeline_eta_which_counts_later_stages(clock):
    p = Progress()
    p.set_plan([StageWork(10, 1, pixels_per_step=1.0), StageWork(20, 2, pixels_per_step=4.0)], done_steps=0)
    p.start_epoch(0, 1, 0)
    steps(p, clock, [5.0] + [1.0] * STEADY_STEPS)
    assert p.stage_eta_s == pytest.approx(10 - STEADY_STEPS - 1)
    assert p.eta_s == pytest.approx(p.stage_eta_s + 20 * 4.0)  # 4x the pixels per step: 4x the time


def test_a_resolution_schedule_counts_the_larger_epochs_ahead_and_rescales_at_each_change(clock):
    p = Progress()
    p.set_plan([StageWork(30, 3, pixels_per_step=2.0, epoch_pixels=(1.0, 1.0, 4.0))], done_steps=0)
    p.start_epoch(0, 1, 0)
    steps(p, clock, [5.0] + [1.0] * STEADY_STEPS)  # epoch 1 at 1 pixel per step: 1 s a step
    left_in_epoch = 10 - STEADY_STEPS - 1
    assert p.stage_eta_s == pytest.approx(left_in_epoch + 10 * 1.0 + 10 * 4.0 + 3 * p._validation_s(p.plan[0]))
    steps(p, clock, [1.0] * left_in_epoch)
    p.validated(0.0)
    p.start_epoch(0, 2, 10)
    steps(p, clock, [1.0] * 10)
    p.validated(0.0)
    p.start_epoch(0, 3, 20)  # 4x the pixels: each step is expected to take 4 s before one is timed
    assert p.stage_eta_s == pytest.approx(10 * 4.0)


def test_unfreezing_layers_measures_the_step_time_anew(clock):
    p = Progress()
    p.set_plan([StageWork(steps=40, epochs=2, pixels_per_step=1.0)], done_steps=0)
    p.start_epoch(0, 1, 0)  # a head-only epoch: fast steps
    steps(p, clock, [1.0] + [0.1] * 19)
    assert p.stage_eta_s is not None
    p.start_epoch(0, 2, 20, retime=True)  # every layer trains now: the head-only pace would be far too hopeful
    assert p.eta_s is None
    steps(p, clock, [1.0] + [1.0] * STEADY_STEPS)
    assert p.stage_eta_s == pytest.approx((20 - STEADY_STEPS - 1) * 1.0 + p._validation_s(p.plan[0]))


def test_one_slow_step_does_not_make_the_eta_jump(clock):
    p = Progress()
    p.set_plan([StageWork(1000, 10, 1.0)], done_steps=0)
    p.start_epoch(0, 1, 0)
    steps(p, clock, [1.0] * 20)
    before = p.eta_s
    steps(p, clock, [10.0])
    assert before < p.eta_s < 2 * before


def test_validation_time_counts_for_the_epochs_left(clock):
    p = Progress()
    p.set_plan([StageWork(40, 4, 1.0, val_images=10, train_images=100)], done_steps=0)
    p.start_epoch(0, 1, 0)
    steps(p, clock, [1.0] * 10)
    p.validated(3.0)
    p.start_epoch(0, 2, 10)
    steps(p, clock, [1.0] * 10)
    assert p.stage_eta_s == pytest.approx(20 * 1.0 + 3 * 3.0)  # 20 steps and the validations of epochs 2 to 4


def test_gpu_usage_only_on_cuda(monkeypatch):
    assert gpu_usage(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (6 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", lambda i: 87)
    assert gpu_usage(torch.device("cuda", 0)) == [{"index": 0, "name": "Test GPU", "memory_used": 10 * 2**30,
                                                  "memory_total": 16 * 2**30, "allocated": 2**30, "utilization": 87}]


def test_steps_keep_the_time_they_ran():
    from core.run_store import RunStore

    store = RunStore()
    store.create_run("r", {})
    store.log_steps("r", 0, 1, [{"step": 1, "train_loss": 1.0, "lr": 0.1, "time": 100.0},
                                {"step": 2, "train_loss": 0.9, "lr": 0.1, "time": 101.5}])
    assert [m["time"] for m in store.metrics("r", "step")] == [100.0, 101.5]
