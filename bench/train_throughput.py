"""Training images/s from real JPEGs (Caltech layout) against the same model fed tensors in memory.

Three feeds of the same training step (ResNet forward, backward, SGD step), interleaved round by
round so that a busy machine slows all of them alike:

* ``cached``  — the trainer's own path: JPEGs decoded once into the uint8 image cache
                (train/image_cache.py), then random crop + flip per sample, normalised on the device;
* ``decode``  — decoding and resizing every JPEG at every step (what the cache avoids);
* ``memory``  — one batch of random tensors already on the device (the upper bound).

Prints training images/s for each (median of single steps taken in turn), the ratios
cached/memory and decode/memory, the images/s of each feed alone (no model) and the one-off cost
of building the cache. Example:

    python bench/train_throughput.py --root /work/shared/data/caltech101-mini --sizes 224 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

from core.datasets import open_dataset  # noqa: E402
from core.models import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_model  # noqa: E402
from train.distributed import pick_device  # noqa: E402
from train.engine import autocast_dtype  # noqa: E402
from train.image_cache import Normalizer, augmentation, open_cached_split  # noqa: E402


def forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def decode_loader(root: str, size: int, batch: int, workers: int) -> DataLoader:
    """JPEG -> resize -> random crop/flip -> tensor at every step (torchvision's classic recipe)."""
    pre = Preprocessing.for_size(size)
    transform = transforms.Compose([
        transforms.Resize(pre.resize, antialias=True), transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    data = open_dataset("caltech101", root, "train", transform=transform)
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def cached_loader(root: str, size: int, batch: int, workers: int) -> tuple[DataLoader, float]:
    pre = Preprocessing.for_size(size)
    started = time.perf_counter()
    cached, _ = open_cached_split("caltech101", root, "train", {}, pre.resize, augmentation("light", size), workers)
    build_s = time.perf_counter() - started
    loader = DataLoader(cached, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    return loader, build_s


class Step:
    """One training step of ``arch`` on ``device`` (AMP and channels_last as the trainer's defaults)."""

    def __init__(self, arch: str, classes: int, device: torch.device, amp: bool = True,
                 channels_last: bool = True) -> None:
        self.device = device
        self.channels_last = channels_last and device.type in ("cuda", "cpu")
        self.model = build_model(arch, classes, "scratch").to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.amp = autocast_dtype(device) if amp else None
        self.normalize = Normalizer(IMAGENET_MEAN, IMAGENET_STD, self.channels_last).to(device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        images = self.normalize(images) if images.dtype == torch.uint8 else images
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = nn.functional.cross_entropy(self.model(images).float(), labels.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_step(step: Step, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for one training step, fetching its batch included."""
    step.sync()
    started = time.perf_counter()
    images, labels = next(batches)
    step(images, labels)
    step.sync()
    return time.perf_counter() - started


def loading_rate(loader: DataLoader, batches: int) -> float:
    """Images/s of the feed alone (no model)."""
    it = forever(loader)
    started = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches))
    return n / (time.perf_counter() - started)


def bench_size(args: argparse.Namespace, size: int, device: torch.device) -> dict[str, float]:
    cached, build_s = cached_loader(args.root, size, args.batch, args.workers)
    decode = decode_loader(args.root, size, args.batch, args.workers)
    load = {"cached": loading_rate(cached, 10), "decode": loading_rate(decode, 10)}
    feeds = {"memory": None, "cached": forever(cached), "decode": forever(decode)}
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    feeds["memory"] = iter(lambda: (images, labels), None)
    step = Step(args.arch, 102, device)
    for feed in feeds.values():  # warm-up: allocator, cuDNN autotune, first worker start
        timed_step(step, feed)
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.steps):  # step by step in turn, so background load hits every feed alike
        for name, feed in feeds.items():
            times[name].append(timed_step(step, feed))
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    return {**rate, "build_s": build_s, "images": len(cached.dataset),
            "load_cached": load["cached"], "load_decode": load["decode"]}


def compare_precision(args: argparse.Namespace, size: int, device: torch.device) -> dict[str, float]:
    """Training img/s (memory feed) with and without mixed precision and channels_last, steps in turn."""
    variants = {"fp32": (False, False), "channels_last": (False, True), "amp": (True, False),
                "amp+channels_last": (True, True)}
    steps = {name: Step(args.arch, 102, device, amp, cl) for name, (amp, cl) in variants.items()}
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    feed = iter(lambda: (images, labels), None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + 1):
        for name, step in steps.items():
            t = timed_step(step, feed)
            if i:  # the first step of each is warm-up
                times[name].append(t)
    return {name: args.batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/work/shared/data/caltech101-mini", help="holds caltech101/101_ObjectCategories")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per feed (the median step counts)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the JPEG feeds")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument("--fresh-cache", action="store_true", help="build the image cache in a temporary folder")
    p.add_argument("--precision", action="store_true",
                   help="instead: compare fp32 / channels_last / mixed precision (amp) on in-memory batches")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.fresh_cache:
        import atexit
        import os
        import shutil

        os.environ["RESLENS_HOME"] = tempfile.mkdtemp(prefix="reslens-bench-")
        atexit.register(shutil.rmtree, os.environ["RESLENS_HOME"], True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    if args.precision:
        for size in args.sizes:
            rates = compare_precision(args, size, device)
            print(f"{args.arch} {size} px, batch {args.batch}, {name}, amp dtype {autocast_dtype(device)}: " +
                  ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()) +
                  f" (amp+channels_last / fp32 = {rates['amp+channels_last'] / rates['fp32']:.2f})")
        return
    print(f"{args.arch}, batch {args.batch}, {args.steps} timed steps per feed (median), "
          f"workers {args.workers}, {name}")
    print("training img/s per feed; 'load' = the feed alone, no model; goal: cached/memory >= 0.9")
    print(f"{'size':>5} {'memory':>8} {'cached':>8} {'decode':>8} {'cached/mem':>11} {'decode/mem':>11} "
          f"{'load cached':>12} {'load decode':>12} {'cache build':>14}")
    for size in args.sizes:
        r = bench_size(args, size, device)
        print(f"{size:>5} {r['memory']:>8.1f} {r['cached']:>8.1f} {r['decode']:>8.1f} "
              f"{r['cached'] / r['memory']:>11.2f} {r['decode'] / r['memory']:>11.2f} "
              f"{r['load_cached']:>12.0f} {r['load_decode']:>12.0f} {r['build_s']:>7.1f} s/{r['images']:.0f}",
              flush=True)


if __name__ == "__main__":
    main()
