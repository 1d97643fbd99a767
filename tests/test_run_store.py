import subprocess
import sys
import threading
import time

import pytest

from core import run_store
from core.run_store import RunNotFound, RunStore, RunStoreError


@pytest.fixture
def store():
    s = RunStore()
    s.create_run("r1", {"name": "demo", "stages": []}, config_yaml="name: demo\n")
    return s


def test_store_lives_in_home_and_uses_wal(store, _isolated):
    assert store.path == _isolated / "reslens.sqlite"
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_create_and_get_run(store):
    run = store.get_run("r1")
    assert run["config"] == {"name": "demo", "stages": []}
    assert run["config_yaml"] == "name: demo\n"
    assert run["state"] == "queued"
    with pytest.raises(RunStoreError, match="already exists"):
        store.create_run("r1", {})
    with pytest.raises(RunNotFound, match="no run named 'nope'"):
        store.get_run("nope")
    with pytest.raises(ValueError):
        store.create_run("../../x", {})


def test_running_with_dead_pid_reads_interrupted(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.set_state("r1", "running", pid=dead.pid)
    assert store.get_run("r1")["state"] == "interrupted"
    assert store.get_run("r1")["stored_state"] == "running"
    store.set_state("r1", "running", pid=None)
    store.set_pid("r1", None)
    assert store.get_run("r1")["state"] == "running"


def test_stale_heartbeat_reads_interrupted(store, monkeypatch):
    store.set_state("r1", "running")
    assert [r["state"] for r in store.list_runs()] == ["running"]
    later = time.time() + run_store.STALE_AFTER_S + 1
    monkeypatch.setattr(run_store.time, "time", lambda: later)
    assert store.list_runs()[0]["state"] == "interrupted"
    store.set_state("r1", "finished")
    assert store.list_runs()[0]["state"] == "finished"


def test_failed_state_keeps_error(store):
    store.set_state("r1", "failed", error="Loss became NaN.")
    run = store.get_run("r1")
    assert (run["state"], run["error"]) == ("failed", "Loss became NaN.")
    with pytest.raises(ValueError):
        store.set_state("r1", "exploded")


def test_heartbeat_progress(store):
    store.heartbeat("r1", stage=1, epoch=2, step=30, done_steps=130, total_steps=400, eta_s=12.5)
    run = store.get_run("r1")
    assert (run["stage"], run["epoch"], run["done_steps"], run["total_steps"], run["eta_s"]) == (1, 2, 130, 400, 12.5)
    with pytest.raises(ValueError):
        store.heartbeat("r1", bogus=1)
    with pytest.raises(RunNotFound):
        store.heartbeat("ghost")


def test_stages_and_best_accuracy(store):
    store.upsert_stage("r1", 0, "pretrain", "shapes", 3, ["a", "b"])
    store.upsert_stage("r1", 1, "finetune", "shapes-lt", 2, ["a", "b", "c"])
    store.update_stage("r1", 0, best_val_acc=0.7, best_path="/x/best.pt", best_epoch=2)
    store.update_stage("r1", 1, best_val_acc=0.9)
    store.upsert_stage("r1", 0, "pretrain", "shapes", 4, ["a", "b"])  # keeps the best path
    stages = store.stages("r1")
    assert [s["name"] for s in stages] == ["pretrain", "finetune"]
    assert stages[0]["class_names"] == ["a", "b"] and stages[0]["epochs"] == 4
    assert stages[0]["best_path"] == "/x/best.pt"
    assert store.list_runs()[0]["best_val_acc"] == 0.9


def test_metric_writes_are_idempotent(store):
    store.log_steps("r1", 0, 0, [{"step": i, "train_loss": 1.0 / (i + 1), "lr": 0.1} for i in range(3)])
    store.log_steps("r1", 0, 0, [{"step": 2, "train_loss": 9.0, "lr": 0.2}])
    store.log_epoch("r1", 0, 0, step=3, train_loss=0.5, val_acc=0.6, val_balanced_acc=0.55)
    store.log_epoch("r1", 0, 0, step=3, train_loss=0.4, val_acc=0.7, val_balanced_acc=0.65)
    steps = store.metrics("r1", "step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert steps[2]["train_loss"] == 9.0 and steps[2]["lr"] == 0.2
    epochs = store.metrics("r1", "epoch")
    assert len(epochs) == 1 and epochs[0]["val_acc"] == 0.7
    assert "lr" in epochs[0] and epochs[0]["lr"] is None
    frame = store.metrics_frame("r1", "epoch")
    assert list(frame["val_acc"]) == [0.7]
    with pytest.raises(ValueError):
        store.log_epoch("r1", 0, 1, val_accuracy=0.3)


def test_truncate_after_removes_later_rows(store):
    for stage in (0, 1):
        for epoch in range(3):
            store.log_epoch("r1", stage, epoch, val_acc=0.1 * epoch)
            store.log_steps("r1", stage, epoch, [{"step": epoch * 10, "train_loss": 1.0, "lr": 0.1}])
            store.save_class_results("r1", stage, epoch, {"classes": ["a"]})
    store.truncate_after("r1", 0, 1)
    assert [(m["stage"], m["epoch"]) for m in store.metrics("r1")] == [(0, 0), (0, 1)]
    assert [m["epoch"] for m in store.metrics("r1", "step")] == [0, 1]
    assert store.class_result_epochs("r1", 0) == [0, 1]
    assert store.class_result_epochs("r1", 1) == []


def test_class_results_latest_and_by_epoch(store):
    assert store.class_results("r1", 0) is None
    for epoch in range(3):
        store.save_class_results("r1", 0, epoch, {"classes": ["a", "b"], "correct": [epoch, 1]})
    assert store.class_results("r1", 0)["epoch"] == 2
    assert store.class_results("r1", 0)["correct"] == [2, 1]
    assert store.class_results("r1", 0, epoch=1)["correct"] == [1, 1]


def test_misclassified_replaced_per_stage(store):
    old = [{"source": "a.jpg", "true": "cat", "predicted": "dog", "confidence": 0.6}]
    new = [{"source": "b.jpg", "true": "cat", "predicted": "dog", "confidence": 0.4},
           {"source": "c.jpg", "true": "dog", "predicted": "cat", "confidence": 0.9}]
    store.save_misclassified("r1", 0, 0, old)
    store.save_misclassified("r1", 0, 1, new)
    rows = store.misclassified("r1", 0)
    assert [r["source"] for r in rows] == ["c.jpg", "b.jpg"]
    assert rows[0]["true"] == "dog" and rows[0]["epoch"] == 1
    assert [r["source"] for r in store.misclassified("r1", 0, true_label="cat")] == ["b.jpg"]


def test_evaluations_round_trip(store):
    result = {"classes": ["a", "b"], "accuracy": 0.5, "balanced_acc": 0.4, "confusion": [[1, 1], [0, 1]]}
    eid = store.add_evaluation("/c/best.pt", "shapes", "val", result,
                               [{"source": "s:1", "true": "a", "predicted": "b", "confidence": 0.8}], run="r1")
    (row,) = store.evaluations(checkpoint="/c/best.pt")
    assert row["id"] == eid and row["accuracy"] == 0.5 and row["data"]["confusion"] == [[1, 1], [0, 1]]
    assert row["misclassified"][0]["predicted"] == "b"
    assert store.evaluations(run="other") == []


def test_delete_run_removes_everything(store):
    store.upsert_stage("r1", 0, "s", "shapes", 1)
    store.log_epoch("r1", 0, 0, val_acc=0.5)
    result = {"classes": ["a"], "accuracy": 1.0, "balanced_acc": 1.0, "confusion": [[1]]}
    store.add_evaluation("/c/best.pt", "shapes", "val", result, run="r1")
    store.delete_run("r1")
    assert store.list_runs() == [] and store.metrics("r1") == [] and store.stages("r1") == []
    assert store.evaluations(run="r1") == []  # a new run of the same name inherits nothing


def test_each_thread_gets_its_own_connection(store):
    results = []

    def worker():
        results.append(store.get_run("r1")["name"])
        store.log_epoch("r1", 0, 5, val_acc=0.1)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert results == ["r1"] and store.metrics("r1")[0]["epoch"] == 5


def test_truncate_after_a_mid_epoch_step(store):
    for epoch in (1, 2):
        store.log_steps("r1", 0, epoch, [{"step": s, "train_loss": 1.0, "lr": 0.1}
                                         for s in range(3 * epoch - 2, 3 * epoch + 1)])
        store.log_epoch("r1", 0, epoch, step=3 * epoch, val_acc=0.5)
    store.truncate_after("r1", 0, 1, step=4)  # epoch 1 complete, one step of epoch 2 kept
    assert [m["step"] for m in store.metrics("r1", "step")] == [1, 2, 3, 4]
    assert [m["epoch"] for m in store.metrics("r1")] == [1]


def test_best_accuracy_of_a_run_is_its_latest_stages(store):
    store.upsert_stage("r1", 0, "pretrain", "shapes", 2)
    store.upsert_stage("r1", 1, "finetune", "shapes-lt", 2)
    store.update_stage("r1", 0, best_val_acc=0.9)
    assert store.list_runs()[0]["best_val_acc"] == pytest.approx(0.9)  # only the first stage has one yet
    store.update_stage("r1", 1, best_val_acc=0.7)
    assert store.list_runs()[0]["best_val_acc"] == pytest.approx(0.7)
    assert store.get_run("r1")["best_val_acc"] == pytest.approx(0.7)


def test_has_metrics(store):
    assert not store.has_metrics("r1")
    store.log_epoch("r1", 0, 1, val_acc=0.5)
    assert store.has_metrics("r1") and not store.has_metrics("nobody")
