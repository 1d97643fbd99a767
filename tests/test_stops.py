"""Issue 11: what a process manager's stop does (a real signal to a real process group with DataLoader workers).

Trainers run as subprocesses in a session of their own, exactly as ``timeout``, ``docker stop`` or systemd see
them. A small wrapper (``PAUSE``) holds the trainer at a chosen point until the test's signal has arrived, so the
signal lands where the test says, not wherever the scheduler puts it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core import paths
from core.checkpoints import load_checkpoint
from core.run_store import RunStore
from tests.test_engine import one_thread, one_thread_env, run_tiny, tiny_config, write_config  # noqa: F401
from train.commands import export_rows
from train.image_cache import cache_dir

REPO = Path(__file__).resolve().parent.parent

# argv: MARKER GO WHERE (step:N | build) then the CLI's own arguments. At WHERE it writes MARKER, then waits
# for the signal (training step) or for GO (inside the image-cache build, possibly in a DataLoader worker).
# The trainer reads the stop flag as the next step starts, applies that step and then saves: a signal held
# at step:1 is saved as 2 batches done.
PAUSE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from train import engine, image_cache
    marker, go, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    if where.startswith("step:"):
        real_after = engine.Trainer._after_step
        def after_step(self, st, epoch, loss, lr, images):
            real_after(self, st, epoch, loss, lr, images)
            if st.index == 0 and st.step == int(where[5:]) and not marker.exists():
                marker.write_text("paused")
                while not self.stop.requested:
                    time.sleep(0.01)
        engine.Trainer._after_step = after_step
    else:
        real_item = image_cache._Decoded.__getitem__
        def item(self, index):
            if not marker.exists():
                marker.write_text("paused")
            while not go.exists():
                time.sleep(0.01)
            return real_item(self, index)
        image_cache._Decoded.__getitem__ = item

    from train.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def start_paused(tmp_path: Path, where: str, *argv: str) -> tuple[subprocess.Popen, Path, Path]:
    marker, go = tmp_path / "paused", tmp_path / "go"
    process = subprocess.Popen([sys.executable, "-c", PAUSE, str(marker), str(go), where, *argv], cwd=REPO,
                               env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    return process, marker, go


def wait_paused(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        assert time.monotonic() < deadline, "timed out waiting for the pause"
        time.sleep(0.02)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=120)
    finally:
        if not _group_gone(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_to_the_process_group_saves_and_resume_continues_exactly(tmp_path, sig):
    raw = tiny_config(tmp_path, epochs=(2,), num_workers=2)  # 3 steps per epoch, two DataLoader workers
    path = write_config(tmp_path, raw)
    trainer, marker, _ = start_paused(tmp_path, "step:1", "run", str(path), "--run-name", "pg", "--quiet")
    wait_paused(marker, trainer)
    os.killpg(trainer.pid, sig)  # the trainer and its workers, as `kill -- -PGID` or a closed terminal
    code, err = _finish(trainer)
    assert code == 1 and "Traceback" not in err, err
    assert _group_gone(trainer.pid)  # no worker left behind
    store = RunStore()
    assert store.get_run("pg")["state"] == "stopped"
    last = load_checkpoint(paths.run_dir("pg") / "stage1-s1" / "last.pt")
    assert (last["epoch"], last["batches_done"], last["step"]) == (0, 2, 2)
    if sig == signal.SIGHUP:
        return
    assert run_tiny(raw, name="pg", resume=True) == "finished"
    rows = export_rows(store, "pg")
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_closing_the_terminal_stops_the_run_like_sigterm(tmp_path):
    """A real closed terminal: the trainer's stdout and stderr are a pty whose other end goes away (writes
    then fail with EIO), and the process group gets SIGHUP, as a terminal emulator's exit does."""
    import pty

    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(2,), num_workers=2))
    marker, go = tmp_path / "paused", tmp_path / "go"
    master, slave = pty.openpty()
    trainer = subprocess.Popen([sys.executable, "-c", PAUSE, str(marker), str(go), "step:1", "run", str(path),
                                "--run-name", "tty"], cwd=REPO, env=one_thread_env(), stdin=slave, stdout=slave,
                               stderr=slave, start_new_session=True)
    os.close(slave)
    os.set_blocking(master, False)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # drain the progress bar so the trainer never blocks on a full pty
            assert trainer.poll() is None and time.monotonic() < deadline, "the trainer never reached step 2"
            try:
                os.read(master, 65536)
            except OSError:
                pass
            time.sleep(0.02)
    finally:
        os.close(master)  # the terminal is gone
    os.killpg(trainer.pid, signal.SIGHUP)
    try:
        trainer.wait(timeout=120)
    finally:
        if not _group_gone(trainer.pid):
            os.killpg(trainer.pid, signal.SIGKILL)
    assert _group_gone(trainer.pid) and trainer.returncode == 1  # `stopped` (no worker left to wait for)
    run = RunStore().get_run("tty")
    assert run["state"] == "stopped", run
    last = load_checkpoint(paths.run_dir("tty") / "stage1-s1" / "last.pt")
    assert (last["epoch"], last["batches_done"], last["step"]) == (0, 2, 2)


def test_a_stop_during_the_image_cache_build_is_a_clean_stop(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,), num_workers=2))
    trainer, marker, go = start_paused(tmp_path, "build", "run", str(path), "--run-name", "cb", "--quiet")
    wait_paused(marker, trainer)  # a DataLoader worker is decoding the first images
    os.killpg(trainer.pid, signal.SIGTERM)
    time.sleep(0.2)  # not an assertion: gives the signal time to arrive before the workers go on
    go.write_text("go")
    code, err = _finish(trainer)
    assert code == 1 and "Traceback" not in err, err
    assert RunStore().get_run("cb")["state"] == "stopped"
    assert sorted(p.name for p in cache_dir().iterdir() if p.suffix == ".npy") == []  # partial file removed
    assert not (paths.run_dir("cb") / "stage1-s1" / "last.pt").exists()  # nothing was trained


def test_eval_under_sigterm_stops_with_one_line_and_leaves_no_partial_cache(tmp_path):
    from core.checkpoints import save_checkpoint
    from core.models import Preprocessing, build_model

    raw = tiny_config(tmp_path, epochs=(1,))
    checkpoint = save_checkpoint(tmp_path / "m.pt", {
        "arch": "resnet18", "num_classes": 3, "class_names": ["ant", "bee", "cat"],
        "preprocessing": Preprocessing.for_size(32).to_dict(), "model": build_model("resnet18", 3).state_dict(),
        "stage_config": raw["stages"][0]})
    process, marker, _ = start_paused(tmp_path, "build", "eval", str(checkpoint))
    wait_paused(marker, process)
    os.killpg(process.pid, signal.SIGTERM)
    code, err = _finish(process)
    assert code == 128 + signal.SIGTERM, err
    assert err.strip() == "stopped by SIGTERM; nothing was left half-written"
    assert [p.name for p in cache_dir().iterdir()] == []


def test_a_second_ctrl_c_during_the_stop_save_lands_after_the_write(tmp_path, monkeypatch):
    """A signal never lands inside torch.save: the stop's checkpoint is written whole, then Ctrl-C acts."""
    import core.checkpoints
    from train.engine import Trainer

    real_after, real_save = Trainer._after_step, core.checkpoints.torch.save

    def after_step(self, st, epoch, loss, lr, images):
        real_after(self, st, epoch, loss, lr, images)
        if st.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: stop after this step

    def save(obj, handle, *args, **kwargs):
        if obj.get("batches_done"):  # the stop's save: Ctrl-C again, now
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, handle, *args, **kwargs)

    from train.engine import Display

    said: list[str] = []
    monkeypatch.setattr(Display, "message", lambda self, text: said.append(text))
    monkeypatch.setattr(Trainer, "_after_step", after_step)
    monkeypatch.setattr(core.checkpoints.torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tiny_config(tmp_path, epochs=(2,)))
    assert RunStore().get_run("tiny")["stored_state"] == "interrupted"
    assert said[-1] == "Run tiny interrupted; `python -m train resume tiny` continues it from its last saved checkpoint."
    folder = paths.run_dir("tiny") / "stage1-s1"
    last = load_checkpoint(folder / "last.pt")
    assert (last["epoch"], last["batches_done"]) == (0, 2)
    assert [p.name for p in folder.iterdir()] == ["last.pt"]


def test_cli_resume_refuses_a_live_trainer_that_stopped_reporting(tmp_path, monkeypatch, capsys):
    from core import run_store
    from train.cli import main

    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(50,)))
    trainer, marker, _ = start_paused(tmp_path, "step:1", "run", str(path), "--run-name", "paused", "--quiet")
    try:
        wait_paused(marker, trainer)
        os.kill(trainer.pid, signal.SIGSTOP)  # alive, silent: its heartbeat goes stale
        monkeypatch.setattr(run_store, "STALE_AFTER_S", 0.0)
        assert RunStore().get_run("paused")["state"] == "interrupted"  # what `list` shows
        assert main(["resume", "paused", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"has a live trainer that stopped reporting (pid {trainer.pid})" in err and err.count("\n") == 1
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.communicate()


STARTING_WORKERS = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from torch.utils.data import DataLoader
    from train.signals import StopFlag, ignore_in_worker, start_workers

    def slow_start(worker_id):
        time.sleep(1.0)  # the stop arrives while the worker is still starting
        ignore_in_worker(worker_id)

    flag = StopFlag()
    flag.install()
    loader = DataLoader(list(range(8)), batch_size=1, num_workers=2, worker_init_fn=slow_start)
    batches = start_workers(loader)
    time.sleep(0.3)
    os.killpg(0, signal.SIGTERM)  # the whole group: this process and both starting workers
    print(sum(1 for _ in batches), flag.requested)
""")


def test_a_stop_while_workers_start_reaches_only_the_main_process(tmp_path):
    """A worker forked by start_workers holds the stop signals blocked until it ignores them: a group stop sent
    before its worker_init_fn ran neither kills it nor is lost by the main process."""
    done = subprocess.run([sys.executable, "-c", STARTING_WORKERS], cwd=REPO, env=one_thread_env(),
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    assert (done.returncode, done.stdout.split()) == (0, ["8", "True"]), done.stderr
