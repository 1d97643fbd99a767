"""Runs written straight into the run store with known numbers, for the comparison tests.

* ``scratch``: one stage ``caltech`` (caltech101, lr 0.1), 2 epochs; the best accuracy (0.7) is at epoch 1, the
  final one is 0.6.
* ``staged``: ``pretrain`` (tinyimagenet, classes x1..x3), then ``finetune`` (caltech101, lr 0.01, freeze 1).
* ``other``: one stage on classes ``p``, ``q`` only (nothing in common with the others).

On the caltech stage (10 validation images per class) the correct counts are, class by class:
scratch 9, 8, 5, 2, 6 and staged 9, 10, 8, 6, 3, so staged against scratch: ant 0, bee +20, cat +30,
dog +40, eel -30 points.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from core.evaluation import class_result
from core.run_store import RunStore

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
TRAIN_COUNTS = [40, 30, 20, 10, 5]
SCRATCH_CORRECT = [9, 8, 5, 2, 6]
STAGED_CORRECT = [9, 10, 8, 6, 3]
VAL_PER_CLASS = 10


def stage_config(name: str, dataset: str, **overrides: Any) -> dict[str, Any]:
    return {"name": name, "dataset": dataset, "epochs": 2, "lr": 0.1, "batch_size": 32, "image_size": 64,
            "options": {}, "init": "scratch", **overrides}


def result_with(classes: list[str], correct: list[int], train_counts: list[int] | None = None) -> dict[str, Any]:
    """A class result whose class i has ``correct[i]`` of ``VAL_PER_CLASS`` right (the misses go to the next
    class)."""
    n = len(classes)
    confusion = np.zeros((n, n), dtype=int)
    for i, right in enumerate(correct):
        confusion[i, i] = right
        confusion[i, (i + 1) % n] += VAL_PER_CLASS - right
    return class_result(classes, confusion, train_counts)


def write_stage(store: RunStore, run: str, index: int, stage: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Stage ``index`` of ``run`` with one epoch row and per-class result per entry of ``results``."""
    store.upsert_stage(run, index, stage["name"], stage["dataset"], stage["epochs"], results[-1]["classes"])
    for epoch, result in enumerate(results, start=1):
        store.log_epoch(run, index, epoch, step=epoch * 3, train_loss=1.5 / epoch, val_loss=1.6 / epoch,
                        val_acc=result["accuracy"], val_balanced_acc=result["balanced_acc"])
        store.save_class_results(run, index, epoch, result)
    store.update_stage(run, index, completed_epochs=len(results))


def write_run(store: RunStore, name: str, stages: list[dict[str, Any]],
              results: list[list[dict[str, Any]]], arch: str = "resnet50") -> None:
    store.create_run(name, {"name": name, "arch": arch, "seed": 0, "amp": True, "stages": stages})
    for index, (stage, stage_results) in enumerate(zip(stages, results)):
        write_stage(store, name, index, stage, stage_results)
    store.set_state(name, "finished")


def scratch_run(store: RunStore | None = None, name: str = "scratch") -> None:
    store = store or RunStore()
    early = result_with(CLASSES, [10, 10, 9, 3, 3], TRAIN_COUNTS)  # 0.7: the best epoch
    write_run(store, name, [stage_config("caltech", "caltech101")],
              [[early, result_with(CLASSES, SCRATCH_CORRECT, TRAIN_COUNTS)]])


def staged_run(store: RunStore | None = None, name: str = "staged") -> None:
    store = store or RunStore()
    pretrain = result_with(["x1", "x2", "x3"], [5, 6, 7], [100, 100, 100])
    write_run(store, name,
              [stage_config("pretrain", "tinyimagenet"),
               stage_config("finetune", "caltech101", lr=0.01, freeze_epochs=1)],
              [[pretrain], [result_with(CLASSES, STAGED_CORRECT, TRAIN_COUNTS)]])


def other_run(store: RunStore | None = None, name: str = "other") -> None:
    store = store or RunStore()
    write_run(store, name, [stage_config("caltech", "pq")], [[result_with(["p", "q"], [4, 7], [8, 8])]],
              arch="resnet18")


def all_runs() -> RunStore:
    """scratch, staged and other in the store of the current home; returns the store."""
    store = RunStore()
    scratch_run(store)
    staged_run(store)
    other_run(store)
    return store
