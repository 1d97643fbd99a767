"""Stores and checkpoints for the app's tests: an empty home, a finished run with every number the pages
draw, a running one, and a small real checkpoint (ResNet-18 at 32 px, saved by core.checkpoints)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from core import paths
from core.checkpoints import save_checkpoint
from core.evaluation import class_result
from core.models import Preprocessing, build_model
from core.run_store import RunStore
from core.synthetic import ShapesDataset

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
IMAGE_SIZE = 64


def shapes_classes() -> list[str]:
    return list(ShapesDataset("shapes-lt", "val").classes)


def make_checkpoint(path: Path, classes: list[str] | None = None, run_name: str = "fixture",
                    image_size: int = IMAGE_SIZE) -> Path:
    """A real ResLens checkpoint of an untrained ResNet-18 (deterministic weights) at ``path``."""
    import torch

    torch.manual_seed(0)
    classes = classes or shapes_classes()
    model = build_model("resnet18", len(classes), "scratch")
    return save_checkpoint(path, {
        "arch": "resnet18", "num_classes": len(classes), "class_names": classes,
        "preprocessing": Preprocessing.for_size(image_size).to_dict(), "model": model.state_dict(),
        "epoch": 0, "stage_index": 0, "stage_name": "finetune", "run_name": run_name, "metrics": {},
    })


def finished_run(name: str = "demo-done", with_checkpoint: bool = True) -> Path | None:
    """A two-stage run in state 'finished' with step and epoch metrics, per-class results and misclassified
    samples (synthetic sources); returns its best checkpoint (or None without one)."""
    store = RunStore()
    classes = shapes_classes()
    store.create_run(name, {"name": name, "stages": [{"dataset": "shapes"}, {"dataset": "shapes-lt"}]})
    best = None
    for stage, (stage_name, dataset) in enumerate((("pretrain", "shapes"), ("finetune", "shapes-lt"))):
        store.upsert_stage(name, stage, stage_name, dataset, epochs=3, class_names=classes)
        for epoch in (1, 2, 3):  # the store numbers epochs from 1, stages from 0 (as the engine writes them)
            store.log_steps(name, stage, epoch, [{"step": epoch * 5 + s, "train_loss": 2.0 / (epoch + s / 5),
                                                  "lr": 0.1 * (1 - s / 10)} for s in range(5)])
            store.log_epoch(name, stage, epoch, step=epoch * 5 + 4, train_loss=1.8 - 0.3 * epoch,
                            val_loss=1.9 - 0.3 * epoch, train_acc=0.4 + 0.1 * epoch, val_acc=0.35 + 0.1 * epoch,
                            val_balanced_acc=0.3 + 0.1 * epoch, lr=0.1 / epoch, images_per_s=120.0,
                            epoch_time_s=30.0)
            store.save_class_results(name, stage, epoch, _class_result(classes, epoch - 1))
        store.update_stage(name, stage, completed_epochs=3, best_val_acc=0.65, best_epoch=2)
    store.save_misclassified(name, 1, 2, [  # the best epoch's (best.pt), kept besides the last epoch's
        {"source": "shapes-lt:val:5", "true": classes[1], "predicted": classes[0], "confidence": 0.7},
    ], best_epoch=2)
    store.save_misclassified(name, 1, 3, [
        {"source": "shapes-lt:val:0", "true": classes[0], "predicted": classes[1], "confidence": 0.8},
        {"source": "shapes-lt:val:3", "true": classes[0], "predicted": classes[2], "confidence": 0.6},
    ])
    if with_checkpoint:
        best = make_checkpoint(paths.run_dir(name) / "stage2-finetune" / "best.pt", classes, name)
        store.update_stage(name, 1, best_path=str(best), last_path=str(best))
    store.set_state(name, "finished")
    return best


def _class_result(classes: list[str], epoch: int) -> dict:
    """A long-tailed confusion matrix that improves with the epoch."""
    rng = np.random.default_rng(epoch)
    n = len(classes)
    val = np.linspace(25, 2, n).astype(int)
    confusion = np.zeros((n, n), dtype=int)
    for i, count in enumerate(val):
        wrong = int(count * (0.5 - 0.1 * epoch) * (i + 1) / n)
        confusion[i, i] = count - wrong
        for _ in range(wrong):
            confusion[i, (i + 1 + int(rng.integers(0, 2))) % n] += 1
    return class_result(classes, confusion, train_counts=(val * 4).tolist())


def running_run(name: str = "demo-live") -> None:
    """A run in state 'running' held by this (live) process, halfway through its first stage."""
    store = RunStore()
    store.create_run(name, {"name": name, "stages": [{"dataset": "shapes"}]})
    store.upsert_stage(name, 0, "pretrain", "shapes", epochs=4, class_names=shapes_classes())
    store.set_state(name, "running", pid=os.getpid())
    store.log_steps(name, 0, 1, [{"step": s, "train_loss": 2.3 - 0.1 * s, "lr": 0.05} for s in range(6)])
    store.log_epoch(name, 0, 1, step=5, train_loss=2.0, val_loss=2.1, val_acc=0.3, val_balanced_acc=0.25,
                    lr=0.05, images_per_s=80.0, epoch_time_s=20.0)
    store.update_stage(name, 0, completed_epochs=1)
    store.heartbeat(name, stage=0, epoch=2, step=9, done_steps=9, total_steps=20, eta_s=42.0, stage_eta_s=30.0,
                    images_per_s=80.0, device="cpu")


def failed_run(name: str = "demo-failed", error: str = "The loss became NaN at epoch 2; lower the learning rate.") -> None:
    store = RunStore()
    store.create_run(name, {"name": name, "stages": [{"dataset": "shapes"}]})
    store.set_state(name, "failed", error=error)


def png_bytes(size: int = 48, colour: tuple[int, int, int] = (200, 30, 30), height: int | None = None) -> bytes:
    """A small real PNG with a rectangle on a background (``size`` square, or ``size`` wide and ``height`` high)."""
    import io

    from PIL import Image, ImageDraw

    height = height or size
    image = Image.new("RGB", (size, height), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((size // 4, height // 4, 3 * size // 4, 3 * height // 4), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(log_path: Path) -> Iterator[str]:
    """`streamlit run app.py` from the checkout (so .streamlit/config.toml applies) on a free port; yields its URL.

    Only the port is given on the command line: the address, XSRF and host checks come from the config.
    """
    with open(log_path, "wb") as log:
        process, url = _start_streamlit(log)
        try:
            yield url
        finally:
            _end(process)


def _start_streamlit(log: IO[bytes], attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """A healthy server and its URL; another try on a new port when one exits first (another process took the
    port between ``free_port`` and the server's bind)."""
    for attempt in range(attempts):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.fileWatcherType", "none"],
            cwd=REPO, env={**os.environ}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process)
            return process, url
        except RuntimeError:
            exited = process.poll() is not None
            _end(process)
            if not exited or attempt == attempts - 1:
                raise
    raise AssertionError("the loop returns or raises")


def _end(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, attempts: int = 240) -> None:
    for _ in range(attempts):
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("streamlit did not become healthy")
