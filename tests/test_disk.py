"""Issue 11: full disks (a real small tmpfs, when running as root), stale temporary files, a lost last.pt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core import paths
from core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from core.run_store import RunStore
from tests.test_engine import one_thread, one_thread_env, run_tiny, tiny_config, write_config  # noqa: F401
from train.image_cache import cache_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (root only; skipped elsewhere) and unmount it afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_during_torch_save_is_the_disk_full_sentence(small_disk):
    disk = small_disk("1m")
    path = save_checkpoint(disk / "last.pt", _payload(torch.ones(1000)))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"the disk is full \(.* free in .*\); the previous checkpoint is intact"):
        save_checkpoint(path, _payload(torch.ones(1_000_000)))  # 4 MB: torch raises RuntimeError "unexpected pos"
    assert path.read_bytes() == before
    assert [p.name for p in disk.iterdir()] == ["last.pt"]


def _payload(weights: torch.Tensor) -> dict:
    from core.models import Preprocessing

    return {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"],
            "preprocessing": Preprocessing.for_size(32).to_dict(), "model": {"w": weights}}


def test_a_run_whose_checkpoint_fills_the_disk_fails_with_one_sentence(small_disk, tmp_path, monkeypatch):
    home = small_disk("16m")  # room for the store and the image cache, not for a ResNet-18 checkpoint
    monkeypatch.setenv("RESLENS_HOME", str(home))
    with pytest.raises(CheckpointError):
        run_tiny(tiny_config(tmp_path, epochs=(1,)))
    run = RunStore().get_run("tiny")
    assert run["state"] == "failed" and "the disk is full" in run["error"] and "inline_container" not in run["error"]
    assert [p.name for p in (paths.run_dir("tiny") / "stage1-s1").iterdir()] == []


def test_a_best_pt_written_before_last_pt_fails_is_recorded(tmp_path, monkeypatch):
    """The disk filled while last.pt was written: best.pt of that epoch exists, and the store says so (`list`
    showed no best accuracy)."""
    from train.engine import Trainer

    real_save = Trainer._save

    def save(self, st, kind, *args):
        if kind == "last":
            raise CheckpointError("the disk is full (0 B free in the run folder); the previous checkpoint is intact.")
        return real_save(self, st, kind, *args)

    monkeypatch.setattr(Trainer, "_save", save)
    with pytest.raises(CheckpointError):
        run_tiny(tiny_config(tmp_path, epochs=(1,)))
    run, stage = RunStore().get_run("tiny"), RunStore().stages("tiny")[0]
    assert run["state"] == "failed" and stage["best_epoch"] == 1 and Path(stage["best_path"]).is_file()
    assert run["best_val_acc"] == stage["best_val_acc"] is not None


def test_a_full_disk_before_the_image_cache_build_is_one_sentence(small_disk, tmp_path):
    home = small_disk("2m")
    raw = tiny_config(tmp_path, epochs=(1,), image_size=256)  # 18 images of 3 x 292 x 292 bytes: 4.6 MB
    path = write_config(tmp_path, raw)
    env = {**one_thread_env(), "RESLENS_HOME": str(home)}
    argv = [sys.executable, "-m", "train", "run", str(path), "--run-name", "full", "--quiet"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr)  # today: SIGBUS (-7), no message
    err = done.stderr.strip()
    assert err.startswith("error: Not enough disk space to build the image cache of caltech101 (train): it needs")
    assert f"in {home / 'cache' / 'images'}" in err and "Traceback" not in err and err.count("\n") == 0
    assert [p.name for p in (home / "cache" / "images").iterdir()] == []  # no partial file fills the disk
    store = RunStore(home / "reslens.sqlite")
    assert store.get_run("full")["state"] == "failed" and "Not enough disk space" in store.get_run("full")["error"]
    again = subprocess.run([sys.executable, "-m", "train", "resume", "full", "--quiet"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: Not enough disk space"), again.stderr


def test_space_is_reserved_before_pixels_are_written(small_disk, tmp_path, monkeypatch):
    """Second line of defence: the disk fills between the check and the build (here: the check is told the
    disk is bigger than it is). Blocks are reserved before the memory map is written, so no SIGBUS."""
    from core.datasets import open_dataset
    from train import image_cache
    from tests.data_fixtures import make_caltech101
    from tests.test_engine import TINY_SIZES

    home = small_disk("2m")
    monkeypatch.setenv("RESLENS_HOME", str(home))
    monkeypatch.setattr(image_cache, "SPACE_MARGIN", -(64 << 20))
    dataset = open_dataset("caltech101", make_caltech101(tmp_path, TINY_SIZES), "train")
    with pytest.raises(image_cache.CacheError, match="Not enough disk space to build the image cache of x"):
        image_cache.cached_pixels(dataset, 292, {"dataset": "x", "split": "train"})
    assert list((home / "cache" / "images").iterdir()) == []


# A writer that stops half-way: MARKER is written once its temporary files exist, then it waits to be killed.
HALF_WRITER = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    import core.checkpoints, torch
    from train import image_cache
    from core.models import Preprocessing
    marker, folder, root = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    started = threading.Barrier(3)

    def stuck_save(obj, handle, *args, **kwargs):
        handle.write(b"PK half a checkpoint")
        handle.flush()
        started.wait()
        time.sleep(600)
    core.checkpoints.torch.save = stuck_save

    def stuck_item(self, index):
        started.wait()
        time.sleep(600)
    image_cache._Decoded.__getitem__ = stuck_item

    payload = {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"],
               "preprocessing": Preprocessing.for_size(32).to_dict(), "model": {}}
    threading.Thread(target=core.checkpoints.save_checkpoint, args=(folder / "best.pt", payload), daemon=True).start()
    threading.Thread(target=image_cache.open_cached_split,
                     args=("caltech101", root, "val", {}, 37, image_cache.augmentation("none", 32)), daemon=True).start()
    started.wait()
    marker.write_text("stuck")
    time.sleep(600)
""")


def _half_writer(tmp_path: Path, name: str, folder: Path, root: Path) -> subprocess.Popen:
    marker = tmp_path / name
    process = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(marker), str(folder), str(root)], cwd=REPO,
                               env=one_thread_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never got stuck"
        time.sleep(0.05)
    return process


def test_stale_temporary_files_are_swept_at_start_and_live_ones_kept(tmp_path):
    from train.config import parse_config
    from train.jobs import prepare_run

    raw = tiny_config(tmp_path, epochs=(1,))
    prepare_run(parse_config(raw), RunStore(), "tiny")
    folder = paths.run_dir("tiny") / "stage1-s1"
    folder.mkdir(parents=True)
    dead = _half_writer(tmp_path, "dead", folder, tmp_path)
    dead.send_signal(signal.SIGKILL)  # as after SIGKILL, the OOM killer or a power cut mid-write
    dead.wait()
    stale = sorted(folder.glob(".best.pt.*.tmp")) + sorted(cache_dir().glob(".build-*.npy"))
    assert len(stale) == 2
    live = _half_writer(tmp_path, "live", folder, tmp_path)
    try:
        owned = set(folder.glob(".best.pt.*.tmp")) | set(cache_dir().glob(".build-*.npy"))
        owned -= set(stale)
        assert len(owned) == 2
        assert run_tiny(raw, resume=True) == "finished"
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in owned)  # a live writer still owns them
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def test_resume_after_a_kill_before_any_checkpoint_says_the_stage_restarts(tmp_path, capsys):
    """Killed while its first checkpoint was being written: the epoch is recorded but no file is there."""
    raw = tiny_config(tmp_path, epochs=(1,))
    assert run_tiny(raw) == "finished"
    for checkpoint in (paths.run_dir("tiny") / "stage1-s1").glob("*.pt"):
        checkpoint.unlink()
    RunStore().set_state("tiny", "interrupted")
    capsys.readouterr()
    assert run_tiny(raw, resume=True) == "finished"
    assert "stage 1 (s1): no last.pt of it is there, so the stage restarts from epoch 1 (its 1 recorded epoch(s) are " \
           "trained again)." in capsys.readouterr().err
    assert run_tiny(tiny_config(tmp_path / "fresh", epochs=(1,)), name="fresh") == "finished"
    assert "restarts" not in capsys.readouterr().err  # a new run says nothing of the kind


def test_resume_after_a_lost_last_pt_keeps_the_better_best(tmp_path, capsys):
    raw = tiny_config(tmp_path, epochs=(1,))
    assert run_tiny(raw) == "finished"
    folder = paths.run_dir("tiny") / "stage1-s1"
    (folder / "last.pt").unlink()
    best = load_checkpoint(folder / "best.pt")
    best["metrics"]["val_acc"] = 0.99  # an earlier, better epoch than the restarted stage can reach
    save_checkpoint(folder / "best.pt", best)
    before = (folder / "best.pt").read_bytes()
    capsys.readouterr()
    RunStore().set_state("tiny", "interrupted")
    assert run_tiny(raw, resume=True) == "finished"
    err = capsys.readouterr().err
    assert "stage 1 (s1): last.pt is missing, so the stage restarts from epoch 1; its best.pt (epoch 1, val acc 0.990)" \
        in err and err.count("\n") == 1
    assert (folder / "best.pt").read_bytes() == before  # never replaced by a worse epoch
    stage = RunStore().stages("tiny")[0]
    assert (stage["best_val_acc"], stage["best_epoch"]) == (0.99, 1)
