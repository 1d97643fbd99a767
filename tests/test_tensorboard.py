"""TensorBoard event files per run when tensorboard is installed; training works the same without it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from core import paths
from tests.test_engine import one_thread, run_tiny, tiny_config  # noqa: F401
from train.tensorboard_log import confusion_image


def test_confusion_image_is_row_normalised():
    image = confusion_image(np.array([[3, 1], [0, 0]]))
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert not np.array_equal(image[0, 0], image[0, 12])  # 75% and 25% differ
    assert np.array_equal(image[12, 0], image[12, 12])  # a class without samples: all zero


def test_a_run_writes_scalars_hparams_and_the_confusion_matrix(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (optional: requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_tiny(tiny_config(tmp_path, epochs=(2, 1))) == "finished"
    folder = paths.run_dir("tiny") / "tensorboard"
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"step/train_loss", "step/lr", "epoch/val_acc", "epoch/train_loss", "epoch/val_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("step/train_loss")] == list(range(1, 10))  # 3 + 3 + 3 steps, global
    assert [e.step for e in events.Scalars("epoch/val_acc")] == [1, 2, 3]  # epochs over the whole pipeline
    assert {"confusion/stage1-s1", "confusion/stage2-s2"} <= set(tags["images"])
    hparams = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert hparams == ["stage1-s1", "stage2-s2"]
    stage = EventAccumulator(str(folder / "stage1-s1")).Reload()
    assert "hparam/best_score" in stage.Tags()["scalars"]


def test_training_works_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert run_tiny(tiny_config(tmp_path, epochs=(1,))) == "finished"
    assert not (paths.run_dir("tiny") / "tensorboard").exists()
