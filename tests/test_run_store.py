import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_a_spawned_trainer_pid_is_recorded_only_while_its_run_is_queued(store):
    store.set_state("r1", "queued")
    store.set_spawned_pid("r1", os.getpid())
    assert store.get_run("r1")["pid"] == os.getpid()
    store.set_state("r1", "running", pid=1)  # the winner of two resumes at once took the run over
    store.set_spawned_pid("r1", os.getpid())  # the refused one's parent records its child late
    assert store.get_run("r1")["pid"] == 1


def test_stale_heartbeat_reads_interrupted(store, monkeypatch):
    store.set_state("r1", "running")
    assert [r["state"] for r in store.list_runs()] == ["running"]
    later = time.time() + run_store.STALE_AFTER_S + 1
    monkeypatch.setattr(run_store.time, "time", lambda: later)
    assert store.list_runs()[0]["state"] == "interrupted"
    store.set_state("r1", "finished")
    assert store.list_runs()[0]["state"] == "finished"


def test_queued_run_that_never_got_a_trainer_reads_interrupted(store, monkeypatch):
    store.create_run("mine", {}, pid=os.getpid())  # a CLI trainer queues its own run under its pid
    assert store.get_run("mine")["pid"] == os.getpid()
    assert store.get_run("r1")["state"] == "queued"  # no pid yet: the app is about to start the trainer
    later = time.time() + run_store.QUEUED_WITHOUT_TRAINER_S + 1
    monkeypatch.setattr(run_store.time, "time", lambda: later)
    states = {r["name"]: r["state"] for r in store.list_runs()}
    assert states == {"r1": "interrupted", "mine": "queued"}  # the app died before starting it; ours is alive


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


def _wrong(*sources):
    return [{"source": s, "true": "cat", "predicted": "dog", "confidence": 0.5 + i / 10}
            for i, s in enumerate(sources)]


def test_misclassified_of_the_last_and_the_best_epoch_are_kept(store):
    store.upsert_stage("r1", 0, "s1", "caltech101", 5, ["cat", "dog"])
    store.save_misclassified("r1", 0, 1, _wrong("a1"), best_epoch=1)
    store.update_stage("r1", 0, best_epoch=1)
    store.save_misclassified("r1", 0, 2, _wrong("b1", "b2"))  # not better: epoch 1 stays the best
    assert store.misclassified_epochs("r1", 0) == [1, 2]
    rows = store.misclassified("r1", 0)  # the last epoch's, most confident first
    assert [r["source"] for r in rows] == ["b2", "b1"] and rows[0]["epoch"] == 2
    assert [r["source"] for r in store.misclassified("r1", 0, epoch=1)] == ["a1"]
    store.save_misclassified("r1", 0, 3, _wrong("c1"))  # epoch 2's go: neither best nor last
    assert store.misclassified_epochs("r1", 0) == [1, 3]
    store.save_misclassified("r1", 0, 4, _wrong("d1"), best_epoch=4)  # a new best: epoch 1's go too
    store.update_stage("r1", 0, best_epoch=4)
    assert store.misclassified_epochs("r1", 0) == [4]
    store.save_misclassified("r1", 0, 4, _wrong("e1"))  # the same epoch again (a resume) replaces its rows
    assert [r["source"] for r in store.misclassified("r1", 0, epoch=4)] == ["e1"]
    store.save_misclassified("r1", 1, 1, _wrong("f1"))  # another stage keeps its own
    assert store.misclassified_epochs("r1", 0) == [4] and store.misclassified("r1", 5) == []
    store.save_misclassified("r1", 0, 5, _wrong("g1"))
    store.truncate_after("r1", 0, 0)  # the stage restarts, its best.pt (epoch 4) kept: so are that epoch's images
    assert store.misclassified_epochs("r1", 0) == [4] and store.misclassified_epochs("r1", 1) == []


def test_misclassified_filtered_by_true_class(store):
    rows = [{"source": "b.jpg", "true": "cat", "predicted": "dog", "confidence": 0.4},
            {"source": "c.jpg", "true": "dog", "predicted": "cat", "confidence": 0.9}]
    store.save_misclassified("r1", 0, 1, rows)
    assert [r["source"] for r in store.misclassified("r1", 0)] == ["c.jpg", "b.jpg"]
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


# The layout ResLens shipped first (schema 1): runs without stage_eta_s, gpu and phase.
_SCHEMA_1_RUNS = """CREATE TABLE runs (
    name TEXT PRIMARY KEY, config_json TEXT NOT NULL, config_yaml TEXT NOT NULL DEFAULT '', config_path TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, state TEXT NOT NULL, pid INTEGER, heartbeat REAL, error TEXT,
    stage INTEGER, epoch INTEGER, step INTEGER, total_steps INTEGER, done_steps INTEGER, eta_s REAL,
    images_per_s REAL, device TEXT)"""
_SCHEMA_1_STAGES = """CREATE TABLE stages (
    run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE, idx INTEGER NOT NULL, name TEXT NOT NULL,
    dataset TEXT NOT NULL, epochs INTEGER NOT NULL, class_names TEXT NOT NULL DEFAULT '[]', last_path TEXT,
    best_path TEXT, best_val_acc REAL, best_epoch INTEGER, completed_epochs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, idx))"""


def _old_store(path, user_version):
    conn = sqlite3.connect(path)
    conn.execute(_SCHEMA_1_RUNS)
    conn.execute(_SCHEMA_1_STAGES)
    conn.execute("INSERT INTO runs (name, config_json, created, updated, state) VALUES"
                 " ('old', '{\"name\": \"old\"}', 1.0, 1.0, 'finished')")
    conn.execute("INSERT INTO stages (run, idx, name, dataset, epochs, best_val_acc) VALUES"
                 " ('old', 0, 'head', 'caltech101', 3, 0.5)")
    conn.execute(f"PRAGMA user_version={user_version}")
    conn.commit()
    conn.close()


def _columns(path, table):
    conn = sqlite3.connect(path)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


@pytest.fixture
def traced(monkeypatch):
    """Every SQL statement the store's connections run, in order."""
    statements = []
    connect = sqlite3.connect

    def traced_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    return statements


@pytest.mark.parametrize("user_version", [0, 1, 2])
def test_an_older_store_is_upgraded_once(tmp_path, traced, user_version):
    path = tmp_path / "old.sqlite"
    _old_store(path, user_version)
    store = RunStore(path)
    assert store.get_run("old")["config"] == {"name": "old"}
    assert store.get_run("old")["best_val_acc"] == 0.5
    assert {"stage_eta_s", "gpu", "phase", "pid_started"} <= set(_columns(path, "runs"))
    assert _columns(path, "metrics")  # the tables the old file lacked exist now
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == run_store.SCHEMA_VERSION
    store.heartbeat("old", stage_eta_s=3.0, gpu=[{"index": 0}], phase="compiling")
    assert store.get_run("old")["gpu"] == [{"index": 0}]
    assert any(s.startswith("ALTER TABLE runs ADD COLUMN") for s in traced)
    store.close()

    traced.clear()
    again = RunStore(path)
    connection_settings = ("PRAGMA busy_timeout", "PRAGMA foreign_keys", "PRAGMA synchronous")
    assert [s for s in traced if not s.startswith(connection_settings)] == ["PRAGMA user_version"]
    assert again.get_run("old")["phase"] == "compiling"
    again.close()


def test_a_schema_4_store_keeps_its_misclassified_rows_under_the_new_key(tmp_path):
    path = tmp_path / "v4.sqlite"
    _old_store(path, 4)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE misclassified (run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE, stage "
                 "INTEGER NOT NULL, epoch INTEGER NOT NULL, rank INTEGER NOT NULL, source TEXT NOT NULL, true_label "
                 "TEXT NOT NULL, predicted TEXT NOT NULL, confidence REAL NOT NULL, PRIMARY KEY (run, stage, rank))")
    conn.execute("INSERT INTO misclassified VALUES ('old', 0, 3, 0, 'x.jpg', 'cat', 'dog', 0.7)")
    conn.commit()
    conn.close()
    store = RunStore(path)
    assert store.misclassified("old", 0) == [{"epoch": 3, "source": "x.jpg", "true": "cat", "predicted": "dog",
                                              "confidence": 0.7}]
    store.save_misclassified("old", 0, 4, _wrong("y.jpg"), best_epoch=3)  # two epochs now fit the key
    assert store.misclassified_epochs("old", 0) == [3, 4]
    store._write("DELETE FROM runs WHERE name = 'old'")  # the rebuilt table still follows its run (cascade)
    assert store.misclassified_epochs("old", 0) == []


def test_a_new_store_has_every_column_in_its_create_statements(tmp_path):
    RunStore(tmp_path / "new.sqlite").close()
    conn = sqlite3.connect(tmp_path / "new.sqlite")
    runs_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
    assert all(f"{column} " in runs_sql for column in ("stage_eta_s", "gpu", "phase", "pid_started"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == run_store.SCHEMA_VERSION
    conn.close()


def test_a_store_from_a_newer_reslens_is_refused_untouched(tmp_path):
    path = tmp_path / "newer.sqlite"
    _old_store(path, run_store.SCHEMA_VERSION + 1)
    before = path.read_bytes()
    with pytest.raises(RunStoreError, match=r"schema version \d+, newer than .* update ResLens"):
        RunStore(path)
    assert path.read_bytes() == before
    assert "phase" not in _columns(path, "runs")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_another_users_process_on_a_reused_pid_is_not_the_trainer(monkeypatch):
    from core.run_store import pid_alive, process_started

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    me, started = os.getpid(), process_started(os.getpid())
    monkeypatch.setattr(run_store.os, "kill", not_permitted)  # as for a process another user owns
    assert pid_alive(me, started) and pid_alive(me)
    assert not pid_alive(me, started + 1)  # the pid was handed on: not the process recorded


def test_a_lock_held_by_another_process_is_one_sentence_or_waited_out(monkeypatch, _isolated):
    monkeypatch.setattr(run_store, "BUSY_TIMEOUT_MS", 100)
    store = RunStore()
    store.create_run("r1", {"name": "demo", "stages": []})
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)  # a browser holding a lock
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(RunStoreError, match=r"is locked by another process \(a database browser or a backup\?\)"):
        store.heartbeat("r1", step=1)
    said: list[str] = []
    store.be_patient(30, said.append)  # a trainer: waits for the lock instead of failing the run
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    store.heartbeat("r1", step=2)
    assert store.get_run("r1")["step"] == 2
    assert said == [f"The run store {store.path} is locked by another process; waiting for it."]
    other.close()


def test_a_home_that_is_a_file_is_one_sentence(tmp_path):
    home = tmp_path / "not-a-folder"
    home.write_text("x")
    with pytest.raises(RunStoreError, match=rf"^The run store's folder {home} cannot be made \(it is a file\); set "
                                            "RESLENS_HOME to a folder you can write to\\.$"):
        RunStore(home / "reslens.sqlite")


def _read_only_folder(monkeypatch, folder):
    """This user may not write ``folder`` (as root, os.access alone says so: SQLite's read-only modes do the rest)."""
    real = os.access
    monkeypatch.setattr(run_store.os, "access", lambda path, mode: False if (Path(path) == folder and mode == os.W_OK)
                        else real(path, mode))


def test_a_store_in_a_folder_that_cannot_be_written_is_read_and_never_written(tmp_path, monkeypatch):
    path = tmp_path / "shared" / "reslens.sqlite"
    writer = RunStore(path)
    writer.create_run("r1", {"name": "demo", "stages": []})
    writer.log_epoch("r1", 0, 1, val_acc=0.5)
    writer.close()
    before = path.read_bytes()
    _read_only_folder(monkeypatch, path.parent)
    store = RunStore(path)
    assert store.read_only and [r["name"] for r in store.list_runs()] == ["r1"]
    assert store.metrics("r1", "epoch")[0]["val_acc"] == 0.5
    with pytest.raises(RunStoreError, match=r"can only be read: its folder .*shared cannot be written by this user"):
        store.set_state("r1", "failed")
    assert path.read_bytes() == before  # (as root, SQLite may still add an empty WAL next to it: test below)


def test_a_store_file_that_cannot_be_written_in_a_folder_that_can_is_read_only_too(tmp_path, monkeypatch):
    path = tmp_path / "reslens.sqlite"
    RunStore(path).create_run("r1", {"name": "demo", "stages": []})
    real = os.access
    monkeypatch.setattr(run_store.os, "access", lambda p, mode: False if (Path(p) == path and mode == os.W_OK)
                        else real(p, mode))
    store = RunStore(path)
    assert store.read_only and store.has_run("r1")
    with pytest.raises(RunStoreError, match="can only be read: the file cannot be written by this user"):
        store.set_state("r1", "failed")


def test_an_older_store_that_cannot_be_written_says_it_needs_one_upgrade(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    _old_store(path, 2)
    before = path.read_bytes()
    _read_only_folder(monkeypatch, tmp_path)
    with pytest.raises(RunStoreError, match=r"older ResLens \(schema 2\) and must be upgraded once, but its folder"):
        RunStore(path)
    assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root and setpriv to drop the capability that lets root write anywhere")
def test_list_and_compare_read_a_read_only_home(tmp_path):
    """For real: a RESLENS_HOME folder without write permission, read by a process that cannot override it;
    nothing in it changes."""
    home = tmp_path / "home"
    writer = RunStore(home / "reslens.sqlite")
    for name in ("a", "b"):
        writer.create_run(name, {"name": name, "stages": [{"dataset": "shapes", "lr": 0.1}]}, state="finished")
    writer.close()
    home.chmod(0o555)
    before = {f.name: f.read_bytes() for f in home.iterdir()}
    try:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "train"]
        env = {**os.environ, "RESLENS_HOME": str(home)}
        listed = subprocess.run([*command, "list"], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert listed.returncode == 0 and {"a", "b"} <= {line.split()[0] for line in listed.stdout.splitlines()}
        deleted = subprocess.run([*command, "delete", "a", "--yes"], env=env, capture_output=True, text=True,
                                 cwd=Path(__file__).parents[1])
        assert deleted.returncode != 0 and "can only be read" in deleted.stderr
        assert {f.name: f.read_bytes() for f in home.iterdir()} == before
    finally:
        home.chmod(0o755)
