"""The run store: one SQLite database (WAL mode), the single source of truth for training runs.

Writers (the trainer, ``train eval``, the app launching a job) and readers (the app pages,
``train list``/``export``) each open their own ``RunStore``. Every write is one short
``BEGIN IMMEDIATE`` transaction, and WAL mode lets readers see the last committed state
without ever blocking a writer. Connections are per thread, as ``sqlite3`` requires.

The schema version lives in ``PRAGMA user_version`` (``SCHEMA_VERSION``). Opening a current store only reads
it; an older store is upgraded once, in one transaction; a store from a newer ResLens is refused, untouched.

Tables (all keyed by the run name):

* ``runs`` — config (YAML text and parsed dict), state, pid, heartbeat, error, progress.
* ``stages`` — one row per pipeline stage: data set, epochs, classes, checkpoint paths, best accuracy.
* ``metrics`` — ``kind='step'`` rows (``train_loss``, ``lr``) and ``kind='epoch'`` rows
  (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``val_balanced_acc``, ``lr``,
  ``images_per_s``, ``epoch_time_s``). Unique per (run, kind, stage, epoch, step): writing the same
  row twice replaces it, so a resumed run never duplicates rows.
* ``class_results`` — per-class counts, correct counts and confusion matrix per (run, stage, epoch).
* ``misclassified`` — misclassified val samples of each stage's last evaluated epoch and of its best epoch (the
  one ``best.pt`` holds).
* ``evaluations`` — results of ``python -m train eval`` (per-class data plus misclassified samples).

Numbering (what the trainer writes): ``stage`` is the 0-based index of the stage in the
config; ``epoch`` counts from 1 (the epoch row ``epoch=2`` is written after the second epoch of
that stage, and a checkpoint's ``epoch`` is the number of completed epochs); ``step`` counts
optimizer steps from 1 within a stage (an epoch row's ``step`` is the last step of that epoch).

Job states: ``queued, running, finished, failed, stopped, interrupted``. Readers get the
*resolved* state: a ``queued``/``running`` run whose process is gone, a ``running`` run whose
heartbeat is older than ``STALE_AFTER_S`` seconds, or a ``queued`` run that got no trainer within
``QUEUED_WITHOUT_TRAINER_S``, reads as ``interrupted``.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from core import paths
from core.errors import UserError

STATES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
ACTIVE_STATES = ("queued", "running")
STALE_AFTER_S = 15.0
QUEUED_WITHOUT_TRAINER_S = 60.0  # a queued run gets its trainer's pid within milliseconds of being queued
BUSY_TIMEOUT_MS = 30_000
LOCK_RETRY_S = 0.5  # a patient writer's pause between waits for another process's lock
# 0: a new file; 1: the first layout (its runs table grew stage_eta_s, gpu and phase later, unversioned);
# 2: every column in the CREATE statements; 3: runs.pid_started; 4: runs.stage_steps; 5: misclassified keyed by epoch
SCHEMA_VERSION = 5
_BEST_EPOCH = "(SELECT best_epoch FROM stages WHERE run = ? AND idx = ?)"  # a stage's best.pt epoch, in SQL

STEP_METRICS = ("train_loss", "lr")
EPOCH_METRICS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr", "images_per_s", "epoch_time_s",
)
METRIC_COLUMNS = tuple(dict.fromkeys(STEP_METRICS + EPOCH_METRICS))
PROGRESS_FIELDS = ("stage", "epoch", "step", "done_steps", "total_steps", "eta_s", "stage_eta_s", "images_per_s",
                   "device", "gpu", "phase", "stage_steps")
# columns that older stores may lack (before schema 2 ResLens added them on every open, unversioned; schema 3 added
# pid_started, schema 4 stage_steps)
_OLDER_LAYOUT_COLUMNS = {"runs": {"stage_eta_s": "REAL", "gpu": "TEXT", "phase": "TEXT", "pid_started": "INTEGER",
                                  "stage_steps": "INTEGER"}}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    config_yaml TEXT NOT NULL DEFAULT '',
    config_path TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    heartbeat REAL,
    error TEXT,
    stage INTEGER,
    epoch INTEGER,
    step INTEGER,
    total_steps INTEGER,
    done_steps INTEGER,
    eta_s REAL,
    images_per_s REAL,
    device TEXT,
    stage_eta_s REAL,
    gpu TEXT,
    phase TEXT,
    pid_started INTEGER,
    stage_steps INTEGER
);
CREATE TABLE IF NOT EXISTS stages (
    run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    dataset TEXT NOT NULL,
    epochs INTEGER NOT NULL,
    class_names TEXT NOT NULL DEFAULT '[]',
    last_path TEXT,
    best_path TEXT,
    best_val_acc REAL,
    best_epoch INTEGER,
    completed_epochs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, idx)
);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('step', 'epoch')),
    stage INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    PRIMARY KEY (run, kind, stage, epoch, step)
);
CREATE TABLE IF NOT EXISTS class_results (
    run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE,
    stage INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run, stage, epoch)
);
CREATE TABLE IF NOT EXISTS misclassified (
    run TEXT NOT NULL REFERENCES runs(name) ON DELETE CASCADE,
    stage INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    source TEXT NOT NULL,
    true_label TEXT NOT NULL,
    predicted TEXT NOT NULL,
    confidence REAL NOT NULL,
    PRIMARY KEY (run, stage, epoch, rank)
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    checkpoint TEXT NOT NULL,
    run TEXT,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    accuracy REAL,
    balanced_acc REAL,
    data TEXT NOT NULL,
    misclassified TEXT NOT NULL DEFAULT '[]'
);
"""


class RunStoreError(UserError):
    """A run-store problem explained in one sentence (unknown run, bad state, ...)."""


class RunNotFound(RunStoreError, KeyError):
    """No run of that name in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def pid_alive(pid: int | None, started: int | None = None) -> bool:
    """True when process ``pid`` exists on this machine and is not a zombie; given ``started`` (``process_started``
    of the process recorded), only when it is still that process, not a later one the pid was handed to."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive, but maybe not the one recorded (/proc says, for any user)
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (macOS): the pid is all there is
    if started is not None and int(fields[19]) != started:
        return False
    return fields[0] not in ("Z", "X")


def process_started(pid: int | None) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22); None where unknown."""
    fields = _proc_stat(pid) if pid and pid > 0 else None
    return int(fields[19]) if fields is not None else None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the state first), or None without them."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def resolve_state(row: dict[str, Any], now: float | None = None) -> str:
    """The state a reader should show: dead or silent active runs, and queued runs that never got a trainer,
    read as ``interrupted``."""
    state = row["state"]
    if state not in ACTIVE_STATES:
        return state
    now = time.time() if now is None else now
    if row.get("pid") and not pid_alive(row["pid"], row.get("pid_started")):
        return "interrupted"
    since = now - (row.get("heartbeat") or row.get("created") or now)
    if state == "queued" and not row.get("pid") and since > QUEUED_WITHOUT_TRAINER_S:
        return "interrupted"  # the app died between queueing the run and starting its trainer
    heartbeat = row.get("heartbeat")
    if state == "running" and heartbeat is not None and now - heartbeat > STALE_AFTER_S:
        return "interrupted"
    return state


class RunStore:
    """Read and write the run store at ``path`` (default ``core.paths.store_path()``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else paths.store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "it is a file" if self.path.parent.is_file() else (exc.strerror or str(exc))
            raise RunStoreError(f"The run store's folder {self.path.parent} cannot be made ({why}); set "
                                "RESLENS_HOME to a folder you can write to.") from exc
        self._local = threading.local()
        self._patience, self._say = 0.0, (lambda text: None)  # see be_patient
        # a store in a folder this user cannot write (a colleague's, a read-only mount) is read, never written
        self.read_only = self.path.is_file() and not (os.access(self.path.parent, os.W_OK)
                                                      and os.access(self.path, os.W_OK))
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            damaged = "" if isinstance(exc, sqlite3.OperationalError) else (
                "; it is damaged or not a ResLens run store: move it away and ResLens starts a new one")
            if not os.access(self.path.parent, os.W_OK):
                damaged = "; its folder is read-only: set RESLENS_HOME to a folder you can write to"
            raise RunStoreError(f"The run store {self.path} cannot be used ({exc}){damaged}.") from exc

    # ----------------------------------------------------------------- plumbing
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect_read_only() if self.read_only else \
                sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A read-only connection: ``mode=ro`` while the writer's WAL index (``-shm``) is there to share, else
        ``immutable``: a snapshot of a store nobody writes at the moment (a copied or finished one; no index can be
        made there). A trainer that starts writing it later is seen by a new session of the app."""
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute("PRAGMA user_version")
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
                raise  # only "no -shm, and none can be made" (a busy store is an error of its own)
        return sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None)

    def _write(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._write_many([(sql, params)])[-1]

    def be_patient(self, seconds: float, say: Callable[[str], None]) -> None:
        """Let writes wait up to ``seconds`` for a lock another process holds (a trainer: a database browser or
        backup holding the store pauses a run instead of failing it), and ``say`` once that it waits."""
        self._patience, self._say = seconds, say

    def _write_many(self, statements: Iterable[tuple[str, Sequence[Any] | dict[str, Any]]]) -> list[sqlite3.Cursor]:
        """Run statements in one short write transaction (BEGIN IMMEDIATE waits for other writers)."""
        if self.read_only:
            what = (f"its folder {self.path.parent}" if not os.access(self.path.parent, os.W_OK) else "the file")
            raise RunStoreError(f"The run store {self.path} can only be read: {what} cannot be written by this user. "
                                "Set RESLENS_HOME to a folder you can write to for this.")
        statements, started, said = list(statements), time.monotonic(), False
        while True:
            try:
                return self._transaction(statements)
            except sqlite3.OperationalError as exc:
                waited = time.monotonic() - started
                if "database is locked" not in str(exc):  # the busy timeout ran out; other errors do not wait
                    raise
                if waited >= self._patience:
                    raise RunStoreError(f"The run store {self.path} is locked by another process (a database "
                                        f"browser or a backup?) and stayed locked for {waited:.0f} s; close it and "
                                        "try again.") from exc
                if not said:
                    self._say(f"The run store {self.path} is locked by another process; waiting for it.")
                    said = True
                time.sleep(LOCK_RETRY_S)

    def _transaction(self, statements: list[tuple[str, Sequence[Any] | dict[str, Any]]]) -> list[sqlite3.Cursor]:
        conn = self._conn()
        with _immediate(conn):
            return [conn.execute(sql, params) for sql, params in statements]

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute(sql, params).fetchall()]

    def _init_schema(self) -> None:
        """Create or upgrade the schema once; opening a current store only reads ``PRAGMA user_version``."""
        conn = self._conn()
        version = self._known_version(conn)
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise RunStoreError(f"The run store {self.path} was written by an older ResLens (schema {version}) and "
                                f"must be upgraded once, but its folder {self.path.parent} cannot be written by this "
                                "user: open it once where it can be written, or copy it to a folder of yours.")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")  # persistent, and not allowed inside a transaction
        with _immediate(conn):
            if self._known_version(conn) < SCHEMA_VERSION:  # read again: another process may have upgraded it
                _upgrade(conn)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _known_version(self, conn: sqlite3.Connection) -> int:
        """The store's schema version; ``RunStoreError`` (and the file left alone) when a newer ResLens wrote it."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RunStoreError(f"The run store {self.path} has schema version {version}, newer than the"
                                f" {SCHEMA_VERSION} this ResLens knows; update ResLens to open it.")
        return version

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------- runs
    def create_run(
        self,
        name: str,
        config: dict[str, Any],
        config_yaml: str = "",
        config_path: str | None = None,
        state: str = "queued",
        pid: int | None = None,
    ) -> None:
        """Add run ``name`` (a safe name) in ``state``, trained by process ``pid`` when known; raise
        ``RunStoreError`` if it exists."""
        paths.safe_name(name)
        _check_state(state)
        now = time.time()
        try:
            self._write(
                "INSERT INTO runs (name, config_json, config_yaml, config_path, created, updated, state, pid,"
                " pid_started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, json.dumps(config), config_yaml, config_path, now, now, state, pid, process_started(pid)),
            )
        except sqlite3.IntegrityError:
            raise RunStoreError(f"A run named {name!r} already exists; choose another name or resume it.") from None

    def has_run(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM runs WHERE name = ?", (name,)))

    def set_state(self, name: str, state: str, error: str | None = None, pid: int | None = None) -> None:
        """Set the job state (``error`` is cleared unless given; ``pid`` kept unless given)."""
        _check_state(state)
        now = time.time()
        self._update_run(name, state=state, error=error, updated=now, heartbeat=now,
                         **({"pid": pid, "pid_started": process_started(pid)} if pid is not None else {}))

    def set_pid(self, name: str, pid: int | None) -> None:
        """Record the run's trainer process (and when it started, so a reused pid is not taken for it)."""
        self._update_run(name, pid=pid, pid_started=process_started(pid), updated=time.time())

    def set_spawned_pid(self, name: str, pid: int) -> None:
        """Record the pid of a trainer just started for run ``name``, only while the run is still queued: a trainer
        that already runs recorded its own (of two resumes at once, the refused one never replaces the winner)."""
        self._write("UPDATE runs SET pid = ?, pid_started = ?, updated = ? WHERE name = ? AND state = 'queued'",
                    (pid, process_started(pid), time.time(), name))

    def heartbeat(self, name: str, **progress: Any) -> None:
        """Record that the trainer is alive, with optional progress fields.

        Progress fields (``PROGRESS_FIELDS``): ``stage``, ``epoch``, ``step``, ``done_steps``, ``total_steps``,
        ``eta_s`` (pipeline), ``stage_eta_s`` (running stage), ``images_per_s``, ``device``, ``gpu`` (a list
        of per-GPU dicts, stored as JSON), ``phase`` (``compiling`` during a torch.compile warm-up, else None),
        ``stage_steps`` (the running stage's optimizer steps in all; ``step`` counts them).
        """
        unknown = set(progress) - set(PROGRESS_FIELDS)
        if unknown:
            raise ValueError(f"unknown progress fields {sorted(unknown)}")
        if "gpu" in progress:
            progress["gpu"] = None if progress["gpu"] is None else json.dumps(progress["gpu"])
        now = time.time()
        self._update_run(name, heartbeat=now, updated=now, **progress)

    def _update_run(self, name: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        cur = self._write(f"UPDATE runs SET {cols} WHERE name = ?", (*fields.values(), name))
        if cur.rowcount == 0:
            raise RunNotFound(f"There is no run named {name!r} in {self.path}.")

    def delete_run(self, name: str) -> None:
        """Forget run ``name`` and everything recorded for it (files on disk are left alone)."""
        self._write_many([(f"DELETE FROM {t} WHERE run = ?", (name,))
                          for t in ("metrics", "class_results", "misclassified", "stages", "evaluations")]
                         + [("DELETE FROM runs WHERE name = ?", (name,))])

    def get_run(self, name: str) -> dict[str, Any]:
        """The run's row as a dict (``config`` parsed, ``state`` resolved, ``stored_state`` raw).

        Raises ``RunNotFound`` when there is no such run.
        """
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE name = ?", (name,))
        if not rows:
            raise RunNotFound(f"There is no run named {name!r}.")
        return _run_view(rows[0], self._best_by_run().get(name))

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first, as ``get_run`` dicts plus ``best_val_acc`` of its latest evaluated stage."""
        best = self._best_by_run()
        return [_run_view(r, best.get(r["name"]))
                for r in self._read(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created DESC")]

    def _best_by_run(self) -> dict[str, float]:
        """Best validation accuracy of each run's latest stage that has one (stages use different data sets,
        so the maximum over stages would compare apples with pears)."""
        rows = self._read("SELECT run, best_val_acc AS best FROM stages WHERE best_val_acc IS NOT NULL ORDER BY idx")
        return {r["run"]: r["best"] for r in rows}  # later stages overwrite earlier ones

    # ----------------------------------------------------------------- stages
    def upsert_stage(
        self, name: str, index: int, stage_name: str, dataset: str, epochs: int, class_names: Sequence[str] = ()
    ) -> None:
        """Create or update stage ``index`` of run ``name`` (keeps checkpoint paths and best accuracy)."""
        self._write(
            "INSERT INTO stages (run, idx, name, dataset, epochs, class_names) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run, idx) DO UPDATE SET name = excluded.name, dataset = excluded.dataset,"
            " epochs = excluded.epochs, class_names = excluded.class_names",
            (name, index, stage_name, dataset, int(epochs), json.dumps(list(class_names))),
        )

    def update_stage(self, name: str, index: int, **fields: Any) -> None:
        """Set ``last_path``, ``best_path``, ``best_val_acc``, ``best_epoch`` or ``completed_epochs``."""
        allowed = {"last_path", "best_path", "best_val_acc", "best_epoch", "completed_epochs"}
        if set(fields) - allowed:
            raise ValueError(f"unknown stage fields {sorted(set(fields) - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE stages SET {cols} WHERE run = ? AND idx = ?", (*fields.values(), name, index))

    def checkpoint_index(self) -> dict[str, dict[str, Any]]:
        """Every checkpoint path the stages record -> ``{"run", "stage", "epoch", "acc"}`` (``acc`` for best.pt)."""
        found: dict[str, dict[str, Any]] = {}
        for r in self._read("SELECT run, idx, last_path, best_path, best_val_acc, best_epoch, completed_epochs"
                            " FROM stages"):
            if r["last_path"]:
                found[r["last_path"]] = {"run": r["run"], "stage": r["idx"], "epoch": r["completed_epochs"]}
            if r["best_path"]:
                found[r["best_path"]] = {"run": r["run"], "stage": r["idx"], "epoch": r["best_epoch"],
                                         "acc": r["best_val_acc"]}
        return found

    def stages(self, name: str) -> list[dict[str, Any]]:
        """The stages of run ``name`` in order; ``class_names`` is a list."""
        rows = self._read("SELECT * FROM stages WHERE run = ? ORDER BY idx", (name,))
        for r in rows:
            r["class_names"] = json.loads(r["class_names"])
        return rows

    # ---------------------------------------------------------------- metrics
    def log_steps(self, name: str, stage: int, epoch: int, rows: Iterable[dict[str, Any]]) -> None:
        """Write per-step rows, each ``{"step": int, "train_loss": float, "lr": float}`` plus optionally the
        ``time`` the step ran (default: now), in one transaction."""
        self._write_many(self._metric_upsert(name, "step", stage, epoch, r["step"], r) for r in rows)

    def log_epoch(self, name: str, stage: int, epoch: int, step: int = 0, **metrics: float | None) -> None:
        """Write (or replace) the epoch row of (stage, epoch); keys are names from ``EPOCH_METRICS``."""
        self._write_many([self._metric_upsert(name, "epoch", stage, epoch, step, metrics)])

    def _metric_upsert(
        self, name: str, kind: str, stage: int, epoch: int, step: int, values: dict[str, Any]
    ) -> tuple[str, list[Any]]:
        allowed = STEP_METRICS if kind == "step" else EPOCH_METRICS
        metrics = {k: v for k, v in values.items() if k not in ("step", "time")}
        if set(metrics) - set(allowed):
            raise ValueError(f"unknown {kind} metrics {sorted(set(metrics) - set(allowed))}")
        cols = ["run", "kind", "stage", "epoch", "step", "time", *metrics]
        params = [name, kind, int(stage), int(epoch), int(step), float(values.get("time") or time.time()),
                  *(None if v is None else float(v) for v in metrics.values())]
        sql = f"INSERT OR REPLACE INTO metrics ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        return sql, params

    def truncate_after(self, name: str, stage: int, epoch: int, step: int | None = None) -> None:
        """Delete every row recorded after the point a resumed run restarts from.

        ``epoch`` is the number of the last *completed* epoch of ``stage`` (0 when none), ``step``
        the last step whose effect is kept (a mid-epoch checkpoint); epoch rows, per-class results
        and misclassified samples of later epochs (but those of the stage's recorded best epoch, which its kept
        best.pt holds), step rows after ``step`` (or of later epochs when ``step`` is None) and every row of later
        stages disappear.
        """
        later = "run = ? AND (stage > ? OR (stage = ? AND epoch > ?))"
        params: tuple[Any, ...] = (name, stage, stage, epoch)
        if step is None:
            metrics = (f"DELETE FROM metrics WHERE {later}", params)
        else:
            metrics = ("DELETE FROM metrics WHERE run = ? AND (stage > ? OR (stage = ? AND ("
                       "(kind = 'epoch' AND epoch > ?) OR (kind = 'step' AND step > ?))))", (*params, step))
        kept_best = f" AND NOT (stage = ? AND epoch IS {_BEST_EPOCH})"
        self._write_many([metrics, (f"DELETE FROM class_results WHERE {later}", params),  # below: best.pt's images
                          (f"DELETE FROM misclassified WHERE {later}{kept_best}", (*params, stage, name, stage))])

    def has_metrics(self, name: str) -> bool:
        """Whether run ``name`` has logged any metric row yet (cheap: one row at most is read)."""
        return bool(self._read("SELECT 1 FROM metrics WHERE run = ? LIMIT 1", (name,)))

    def metrics(self, name: str, kind: str = "epoch", stage: int | None = None) -> list[dict[str, Any]]:
        """Metric rows of ``kind`` ('step' or 'epoch') in order, as flat dicts (unused metrics dropped)."""
        columns = _metric_columns(kind)
        return [dict(zip(columns, row)) for row in self._metric_rows(name, kind, stage)]

    def metrics_frame(self, name: str, kind: str = "epoch", stage: int | None = None):  # -> pandas.DataFrame
        """``metrics`` as a pandas DataFrame (columns always present, even when empty)."""
        import pandas as pd

        return pd.DataFrame(self._metric_rows(name, kind, stage), columns=list(_metric_columns(kind)))

    def _metric_rows(self, name: str, kind: str, stage: int | None) -> list[tuple[Any, ...]]:
        """Plain tuples in ``_metric_columns(kind)`` order: a long run has 100,000s of step rows, which
        ``sqlite3.Row`` objects and dicts would make several times slower to read."""
        if kind not in ("step", "epoch"):
            raise ValueError("kind must be 'step' or 'epoch'")
        sql = f"SELECT {', '.join(_metric_columns(kind))} FROM metrics WHERE run = ? AND kind = ?"
        params: list[Any] = [name, kind]
        if stage is not None:
            sql += " AND stage = ?"
            params.append(stage)
        cursor = self._conn().cursor()
        cursor.row_factory = None
        return cursor.execute(sql + " ORDER BY stage, epoch, step", params).fetchall()

    def all_metrics(self, name: str) -> list[dict[str, Any]]:
        """Every metric row (steps and epochs) with a ``kind`` key, for export."""
        rows = self._read("SELECT * FROM metrics WHERE run = ? ORDER BY stage, epoch, kind DESC, step", (name,))
        for r in rows:
            del r["run"]
        return rows

    # ------------------------------------------------------- per-class results
    def save_class_results(self, name: str, stage: int, epoch: int, result: dict[str, Any]) -> None:
        """Store one epoch's per-class result (a dict from ``core.evaluation``: classes, counts, confusion...)."""
        self._write(
            "INSERT OR REPLACE INTO class_results (run, stage, epoch, time, data) VALUES (?, ?, ?, ?, ?)",
            (name, stage, epoch, time.time(), json.dumps(result)),
        )

    def class_results(self, name: str, stage: int, epoch: int | None = None) -> dict[str, Any] | None:
        """The per-class result of (stage, epoch), or of the latest epoch when ``epoch`` is None.

        The dict has ``classes``, ``train_counts``, ``val_counts``, ``correct``, ``confusion``
        (rows = true class, columns = predicted), ``accuracy``, ``balanced_acc`` plus ``stage``
        and ``epoch``. None when nothing was stored.
        """
        sql = "SELECT epoch, data FROM class_results WHERE run = ? AND stage = ?"
        params: list[Any] = [name, stage]
        if epoch is not None:
            sql += " AND epoch = ?"
            params.append(epoch)
        rows = self._read(sql + " ORDER BY epoch DESC LIMIT 1", params)
        if not rows:
            return None
        return {**json.loads(rows[0]["data"]), "stage": stage, "epoch": rows[0]["epoch"]}

    def class_result_epochs(self, name: str, stage: int) -> list[int]:
        """Epochs of ``stage`` that have per-class results, ascending."""
        rows = self._read("SELECT epoch FROM class_results WHERE run = ? AND stage = ? ORDER BY epoch", (name, stage))
        return [r["epoch"] for r in rows]

    def save_misclassified(self, name: str, stage: int, epoch: int, samples: Sequence[dict[str, Any]],
                           best_epoch: int | None = None) -> None:
        """Store ``samples`` of ``epoch``, keeping besides them only those of the stage's best epoch: ``best_epoch``
        (this epoch when it is the new best), else the stage's ``best_epoch`` in the store.

        Each sample: ``{"source": str, "true": class name, "predicted": class name, "confidence": float}``.
        """
        statements: list[tuple[str, Sequence[Any]]] = [
            ("DELETE FROM misclassified WHERE run = ? AND stage = ? AND (epoch = ? OR epoch IS NOT "
             f"COALESCE(?, {_BEST_EPOCH}))", (name, stage, epoch, best_epoch, name, stage))
        ]
        statements += [
            ("INSERT INTO misclassified VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
             (name, stage, epoch, i, s["source"], s["true"], s["predicted"], float(s["confidence"])))
            for i, s in enumerate(samples)
        ]
        self._write_many(statements)

    def misclassified_epochs(self, name: str, stage: int) -> list[int]:
        """Epochs of ``stage`` whose misclassified samples are kept (its best and its last), ascending."""
        rows = self._read("SELECT DISTINCT epoch FROM misclassified WHERE run = ? AND stage = ? ORDER BY epoch",
                          (name, stage))
        return [r["epoch"] for r in rows]

    def misclassified(self, name: str, stage: int, true_label: str | None = None,
                      epoch: int | None = None) -> list[dict[str, Any]]:
        """Misclassified val samples of ``epoch`` (default: the latest epoch that has any), most confident first."""
        sql = "SELECT epoch, source, true_label AS true, predicted, confidence FROM misclassified" \
              " WHERE run = ? AND stage = ? AND epoch = COALESCE(?, (SELECT MAX(epoch) FROM misclassified" \
              " WHERE run = ? AND stage = ?))"
        params: list[Any] = [name, stage, epoch, name, stage]
        if true_label is not None:
            sql += " AND true_label = ?"
            params.append(true_label)
        return self._read(sql + " ORDER BY confidence DESC, rank", params)

    # ------------------------------------------------------------ evaluations
    def add_evaluation(
        self,
        checkpoint: str,
        dataset: str,
        split: str,
        result: dict[str, Any],
        misclassified: Sequence[dict[str, Any]] = (),
        run: str | None = None,
    ) -> int:
        """Store a ``train eval`` result (a ``core.evaluation`` dict, with ``note`` when its data changed since
        training: ``engine.split_changed``); returns its id."""
        cur = self._write(
            "INSERT INTO evaluations (time, checkpoint, run, dataset, split, accuracy, balanced_acc, data,"
            " misclassified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), checkpoint, run, dataset, split, result.get("accuracy"), result.get("balanced_acc"),
             json.dumps(result), json.dumps(list(misclassified))),
        )
        return int(cur.lastrowid)

    def evaluations(self, checkpoint: str | None = None, run: str | None = None) -> list[dict[str, Any]]:
        """Stored evaluations, newest first; ``data`` and ``misclassified`` are parsed."""
        sql, params = "SELECT * FROM evaluations WHERE 1 = 1", []
        for column, value in (("checkpoint", checkpoint), ("run", run)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = self._read(sql + " ORDER BY id DESC", params)
        for r in rows:
            r["data"] = json.loads(r["data"])
            r["misclassified"] = json.loads(r["misclassified"])
        return rows


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One BEGIN IMMEDIATE transaction (it waits for other writers): committed, or rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a new or older store to ``SCHEMA_VERSION`` inside the caller's transaction: create the missing tables,
    then add the columns an older layout's tables lack."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    if "epoch" not in _primary_key(conn, "misclassified"):  # schema < 5 kept one epoch per stage
        _rebuild(conn, "misclassified")
    for table, columns in _OLDER_LAYOUT_COLUMNS.items():
        have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column, kind in columns.items():
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _primary_key(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r["name"] for r in conn.execute(f"PRAGMA table_info({table})") if r["pk"]}


def _rebuild(conn: sqlite3.Connection, table: str) -> None:
    """Give ``table`` its current layout (a new primary key), keeping its rows: SQLite cannot alter a key."""
    create = next(s for s in _SCHEMA.split(";") if f"EXISTS {table} (" in s)
    conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    conn.execute(create)
    conn.execute(f"INSERT INTO {table} SELECT * FROM {table}_old")
    conn.execute(f"DROP TABLE {table}_old")


def _metric_columns(kind: str) -> tuple[str, ...]:
    return ("stage", "epoch", "step", "time") + (STEP_METRICS if kind == "step" else EPOCH_METRICS)


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")


# a run's row, and the epochs its current stage finished (for shown_epoch)
_RUN_COLUMNS = ("runs.*, (SELECT completed_epochs FROM stages WHERE stages.run = runs.name AND stages.idx = "
                "COALESCE(runs.stage, 0)) AS stage_epochs_done")


def _run_view(row: dict[str, Any], best: float | None) -> dict[str, Any]:
    view = dict(row)
    done = view.pop("stage_epochs_done")
    view["config"] = json.loads(view.pop("config_json"))
    view["gpu"] = json.loads(view["gpu"]) if view.get("gpu") else None
    view["stored_state"] = row["state"]
    view["state"] = resolve_state(row)
    view["best_val_acc"] = best
    # a running stage shows the epoch in progress; any other the epochs it finished (a stop drops the one it was in)
    view["shown_epoch"] = view["epoch"] if view["state"] in ACTIVE_STATES else done
    return view
