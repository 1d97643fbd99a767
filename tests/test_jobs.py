"""Detached trainer jobs for the app: launch, stop, resume, log tail."""
import os
import time
from pathlib import Path

import pytest

from core import paths
from core.run_store import RunStore, RunStoreError
from tests.test_engine import one_thread, tiny_config  # noqa: F401
from train import jobs
from train.config import ConfigError


def wait_state(name, states, timeout=90.0):
    store = RunStore()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(name)
        if run["state"] in states:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {name} stayed {run['state']}; log:\n{jobs.tail_log(name)}")


def test_launch_stop_resume_and_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    raw = tiny_config(tmp_path, epochs=(3,))
    name = jobs.launch(raw)
    assert name == "tiny"
    store = RunStore()
    run = store.get_run(name)  # the row exists as soon as launch returns
    assert run["state"] in ("queued", "running") and run["pid"]
    assert (paths.run_dir(name) / "config.yaml").is_file()
    assert jobs.launch(raw) == "tiny-2"  # the name is made unique
    jobs.stop("tiny-2")
    wait_state(name, ("running",))
    deadline = time.monotonic() + 90
    while not store.metrics(name):  # let one epoch finish
        assert time.monotonic() < deadline, f"no epoch finished; log:\n{jobs.tail_log(name)}"
        time.sleep(0.1)
    with pytest.raises(RunStoreError, match="still running"):
        jobs.resume(name)
    assert jobs.stop(name) is True
    stopped = wait_state(name, ("stopped",))
    assert stopped["stored_state"] == "stopped"
    assert wait_state("tiny-2", ("stopped",))["state"] == "stopped"
    jobs.resume(name)
    wait_state(name, ("finished",))
    assert [m["epoch"] for m in store.metrics(name)] == [1, 2, 3]
    log = jobs.tail_log(name, lines=5)
    assert "Run tiny finished." in log and len(log.splitlines()) <= 5
    assert "stopped" in jobs.tail_log(name, lines=200)
    with pytest.raises(RunStoreError, match="already finished"):
        jobs.resume(name)


def test_launch_refuses_bad_config_before_writing(tmp_path):
    raw = tiny_config(tmp_path, epochs=(1,), lr=-1)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        jobs.launch(raw)
    assert RunStore().list_runs() == []


def test_launch_refuses_an_init_checkpoint_of_another_architecture_before_writing(tmp_path):
    from core.checkpoints import save_checkpoint
    from core.models import Preprocessing, build_model

    other = save_checkpoint(tmp_path / "r34.pt", {
        "arch": "resnet34", "num_classes": 2, "class_names": ["x", "y"],
        "preprocessing": Preprocessing.for_size(32).to_dict(), "model": build_model("resnet34", 2).state_dict()})
    raw = tiny_config(tmp_path, epochs=(1, 1))
    raw["stages"][1]["init"] = str(other)
    with pytest.raises(ConfigError, match=r"^stage 2 \(s2\): init checkpoint .*r34.pt holds a resnet34, but a "
                                          r"resnet18 is expected") as refused:
        jobs.launch(raw)
    assert (refused.value.stage, refused.value.field) == (1, "init")
    assert RunStore().list_runs() == [] and not paths.runs_dir().exists()


def test_launch_refuses_imagenet_weights_it_cannot_get_before_writing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached there

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    raw = tiny_config(tmp_path, epochs=(1,), init="imagenet")
    with pytest.raises(ConfigError, match=r"^stage 1 \(s1\): ImageNet weights for resnet18 are not available: "
                                          r"resnet18-f37072fd.pth is not in the torchvision cache"):
        jobs.launch(raw)
    assert RunStore().list_runs() == []


@pytest.mark.parametrize("bad", ["../../x", "/tmp/evil", "a b", "..", "x/../../y"])
def test_run_names_cannot_escape_the_runs_folder(tmp_path, bad):
    with pytest.raises(RunStoreError, match="not allowed"):
        jobs.launch(tiny_config(tmp_path, epochs=(1,)), run_name=bad)
    assert not (tmp_path.parent / "x").exists() and not os.path.exists("/tmp/evil")
    assert RunStore().list_runs() == []


def test_tail_log_collapses_progress_redraws(tmp_path):
    log = jobs.log_path("r")
    log.parent.mkdir(parents=True)
    log.write_text("start\nepoch 1: 10%\repoch 1: 50%\repoch 1: 100%\nend\n")
    assert jobs.tail_log("r") == "start\nepoch 1: 100%\nend"
    assert jobs.tail_log("r", lines=1) == "end"
    assert jobs.tail_log("missing") == ""


def test_a_job_that_cannot_start_says_why(tmp_path):
    import shutil

    raw = tiny_config(tmp_path, epochs=(1,))
    name = jobs.launch(raw)
    shutil.rmtree(tmp_path / "caltech101")  # the data disappears before the trainer reads the config
    run = wait_state(name, ("failed", "finished", "interrupted"))  # the trainer needs seconds to import torch
    assert run["state"] == "failed" and "Caltech-101 data set was not found" in run["error"]


def test_kill_and_resume_leave_other_processes_alone():
    store = RunStore()
    store.create_run("quiet", {"name": "quiet", "stages": []})
    store.set_state("quiet", "running", pid=os.getpid())  # a live pid whose heartbeat is stale
    store._write("UPDATE runs SET heartbeat = 0 WHERE name = 'quiet'")
    assert store.get_run("quiet")["state"] == "interrupted"
    with pytest.raises(RunStoreError, match="live trainer"):
        jobs.resume("quiet")
    with pytest.raises(RunStoreError, match="live trainer .* stop it before deleting it"):
        jobs.delete("quiet")  # its trainer may carry on: its files stay
    assert store.has_run("quiet")
    store.set_state("quiet", "finished")
    assert jobs.kill("quiet") is False  # finished: its old pid may be anyone's now


HOLD_LOCK = """import fcntl, sys
lock = open(sys.argv[1], "a")
fcntl.lockf(lock, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
fcntl.lockf(lock, fcntl.LOCK_UN)
sys.stdin.read()
"""


def test_resume_and_delete_wait_for_a_stopped_trainer_to_let_go_of_the_run(monkeypatch):
    """A trainer stores "stopped", then shuts its workers down and frees the run's lock: a Resume clicked in
    between used to start a second trainer that the lock refused, leaving the run 'interrupted'. A live process
    that has let go (a notebook that trained in-process) is not waited for."""
    import subprocess
    import sys
    import threading

    store = RunStore()
    store.create_run("ending", {"name": "ending", "stages": []})
    paths.run_dir("ending").mkdir(parents=True)
    trainer = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(paths.run_dir("ending") / ".trainer.lock")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "locked\n"
        store.set_state("ending", "running", pid=trainer.pid)
        store.set_state("ending", "stopped")  # stored; the trainer still holds the run
        run = store.get_run("ending")
        assert run["state"] == "stopped" and not jobs.has_live_trainer(run)
        monkeypatch.setattr(jobs, "TRAINER_EXIT_S", 0.2)
        with pytest.raises(RunStoreError, match=r"has ended, but its trainer \(pid \d+\) still holds it 0 s later; "
                                                r"try deleting it again when it has exited"):
            jobs.delete("ending")
        assert store.has_run("ending")
        monkeypatch.setattr(jobs, "TRAINER_EXIT_S", 60.0)

        def let_go():
            trainer.stdin.write("\n")
            trainer.stdin.flush()

        threading.Timer(0.5, let_go).start()
        jobs.refuse_live_trainer(run)  # returns once the lock is free
        assert trainer.poll() is None  # alive, and no longer waited for
        assert jobs.delete("ending") >= 0 and not store.has_run("ending")
    finally:
        trainer.kill()
        trainer.communicate()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_pid_handed_to_another_process_is_not_the_trainer():
    from core.run_store import process_started

    store = RunStore()
    store.create_run("gone", {"name": "gone", "stages": []})
    store.set_state("gone", "running", pid=os.getpid())  # the trainer died; its pid went to this process
    assert store.get_run("gone")["pid_started"] == process_started(os.getpid())
    store._write("UPDATE runs SET pid_started = pid_started - 1 WHERE name = 'gone'")
    run = store.get_run("gone")
    assert run["state"] == "interrupted" and not jobs.has_live_trainer(run)
    assert jobs.stop("gone") is False  # nothing to signal: this process is left alone
    assert jobs.kill("gone") is False
    jobs.refuse_live_trainer(run)  # resume and delete are not refused: the trainer of record is dead
    assert jobs.delete("gone") == 0 and not store.has_run("gone")


def test_launches_at_once_get_names_of_their_own(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from train.config import parse_config

    config = parse_config(tiny_config(tmp_path), check_data=False)
    with ThreadPoolExecutor(max_workers=6) as pool:
        names = list(pool.map(lambda _: jobs.prepare_run(config, RunStore()), range(6)))
    assert len(set(names)) == 6 and set(names) == {r["name"] for r in RunStore().list_runs()}
    assert all((paths.run_dir(n) / "config.yaml").is_file() for n in names)


def test_an_explicit_name_never_reuses_a_leftover_folder(tmp_path):
    from train.config import parse_config

    config = parse_config(tiny_config(tmp_path), check_data=False)
    paths.run_dir("old").mkdir(parents=True)
    with pytest.raises(RunStoreError, match="folder for run 'old' already exists"):
        jobs.prepare_run(config, RunStore(), "old")
    assert jobs.prepare_run(config, RunStore()) == config.name  # the config's own name is still free


def test_a_run_whose_folder_cannot_be_made_leaves_no_row(tmp_path):
    from train.config import parse_config

    config = parse_config(tiny_config(tmp_path), check_data=False)
    paths.runs_dir().parent.mkdir(parents=True, exist_ok=True)
    paths.runs_dir().write_text("a file where the runs folder belongs")  # mkdir fails, as on a read-only folder
    with pytest.raises(RunStoreError, match=r"Cannot create the folder of run 'mine' \(.*\); nothing was started"):
        jobs.prepare_run(config, RunStore(), "mine")
    assert not RunStore().has_run("mine")  # not left 'queued', then 'interrupted' with no reason
