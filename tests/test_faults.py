"""Issue 6, jobs and the run store: concurrent writers, full disks, killed trainers."""
import errno
import signal
import subprocess
import sys
import textwrap

import pytest

from core import paths
from core.checkpoints import CheckpointError, load_checkpoint
from core.run_store import RunStore
from tests.test_engine import one_thread, one_thread_env, run_tiny, tiny_config, write_config  # noqa: F401
from tests.test_stops import start_paused, wait_paused
from train.commands import export_rows

ROWS_PER_WRITER = 150

WRITER = textwrap.dedent(
    """
    import sys
    from core.run_store import RunStore
    store = RunStore()
    run, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        store.log_steps(run, 0, 0, [{"step": i, "train_loss": 1.0, "lr": 0.1}])
        if i % 10 == 0:
            store.heartbeat(run, step=i)
    """
)


def test_two_writers_and_a_reader_lose_nothing(tmp_path):
    store = RunStore()
    for run in ("w1", "w2"):
        store.create_run(run, {}, state="running")
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, run, str(ROWS_PER_WRITER)], stderr=subprocess.PIPE, text=True)
        for run in ("w1", "w2")
    ]
    reads = 0
    while any(w.poll() is None for w in writers):
        for run in store.list_runs():
            store.metrics(run["name"], "step")
        reads += 1
    errors = [w.stderr.read() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert not any("locked" in e for e in errors)
    assert reads > 0
    for run in ("w1", "w2"):
        assert [m["step"] for m in store.metrics(run, "step")] == list(range(ROWS_PER_WRITER))


# ------------------------------------------------------------- killed trainer
def test_sigkill_mid_epoch_then_resume_loses_and_duplicates_nothing(tmp_path):
    raw = tiny_config(tmp_path, epochs=(4,))
    path = write_config(tmp_path, raw)
    store = RunStore()
    trainer, paused, _ = start_paused(tmp_path, "step:4", "run", str(path), "--run-name", "k", "--quiet")
    try:
        wait_paused(paused, trainer)  # held after step 4 of 12: in epoch 2, however slow the machine
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.communicate()
    assert store.get_run("k")["state"] == "interrupted"  # pid gone: no need to wait for the heartbeat
    assert store.get_run("k")["stored_state"] == "running"
    last = load_checkpoint(paths.run_dir("k") / "stage1-s1" / "last.pt")
    assert (last["epoch"], last["batches_done"]) == (1, 0)  # epoch 1's: the kill saved nothing
    resumed = subprocess.run([sys.executable, "-m", "train", "resume", "k", "--quiet"], env=one_thread_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = export_rows(store, "k")
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 13))  # 3 steps x 4 epochs
    assert store.get_run("k")["state"] == "finished"
    assert store._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ------------------------------------------------------------------ full disk
def test_full_disk_while_saving_fails_clearly_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import core.checkpoints

    real_save = core.checkpoints.torch.save
    calls = []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # last.pt of epoch 2 (epoch 1 wrote last.pt and best.pt)
            handle.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(core.checkpoints.torch, "save", save)
    with pytest.raises(CheckpointError):
        run_tiny(tiny_config(tmp_path, epochs=(2,)))
    run = RunStore().get_run("tiny")
    assert run["state"] == "failed" and "disk is full" in run["error"]
    folder = paths.run_dir("tiny") / "stage1-s1"
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
