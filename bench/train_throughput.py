"""Training images/s from real JPEGs (Caltech layout) against the same model fed tensors in memory.

Feeds of the same training step (ResNet forward, backward, SGD step), interleaved round by round so
that a busy machine slows all of them alike:

* ``memory``   — one batch of random tensors already on the device (the eager upper bound);
* ``compiled`` — the same batch, the model under ``torch.compile`` (the compiled synthetic reference;
                 ``--compile``, default on CUDA);
* ``cached``   — the per-sample path: JPEGs decoded once into the uint8 image cache
                 (train/image_cache.py), random crop + flip per sample in DataLoader workers,
                 normalised on the device (``data_path: workers``);
* ``device``   — the batched path: the same cache gathered and augmented a batch at a time on the
                 device (train/device_batches.py, ``data_path: device``);
* ``decode``   — decoding and resizing every JPEG at every step (what the cache avoids).

Prints training images/s for each (median of single steps taken in turn), ratios to ``memory``, the
images/s of each feed alone (no model) and the one-off cost of building the cache. ``--trainer`` also
runs the trainer itself (train/engine.py, one stage, ``--trainer-epochs`` epochs, ``data_path: auto``,
``compile`` as ``--compile``) on the same images and reports its last epoch's images/s against the
reference (compiled when ``--compile``): not interleaved, but in the same run. Without Caltech JPEGs at
``--root``, ``--synthetic N`` writes N Caltech-layout JPEGs into a temporary folder. ``--precision`` and
``--speed-options`` instead compare variants of the step on the memory feed: fp32 / channels_last / amp, or
the trainer's default against a fused SGD, ``torch.compile`` and CUDA graphs (the last two on CUDA). Examples:

    python bench/train_throughput.py --root /work/shared/data/caltech101-mini --sizes 224 64
    python bench/train_throughput.py --device cuda --batch 256 --workers 12 --synthetic 4096 --trainer
    python bench/train_throughput.py --device cuda --batch 256 --sizes 96 --speed-options
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

from core.datasets import open_dataset  # noqa: E402
from core.models import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_model  # noqa: E402
from train.device_batches import DeviceBatches  # noqa: E402
from train.distributed import ShardedSampler, pick_device  # noqa: E402
from train.engine import autocast_dtype  # noqa: E402
from train.image_cache import CachedImages, Normalizer, augmentation, open_cached_split  # noqa: E402

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def forever(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def epochs_of(batches: DeviceBatches, sampler: ShardedSampler) -> Batches:
    """``batches`` epoch after epoch (a new seeded order each time, as in the trainer)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from batches
        epoch += 1


def write_synthetic_caltech(root: Path, images: int, classes: int = 20, seed: int = 0) -> Path:
    """``images`` JPEGs (300x200, smooth colour fields plus noise) in Caltech-101's layout under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "caltech101" / "101_ObjectCategories" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((300, 200), Image.BILINEAR)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (200, 300, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"image_{i // classes + 1:04d}.jpg", quality=85)
    return root


def decode_loader(root: str, size: int, batch: int, workers: int) -> DataLoader:
    """JPEG -> resize -> random crop/flip -> uint8 tensor at every step (normalised on the device)."""
    pre = Preprocessing.for_size(size)
    transform = transforms.Compose([
        transforms.Resize(pre.resize, antialias=True), transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(), transforms.PILToTensor(),
    ])
    data = open_dataset("caltech101", root, "train", transform=transform)
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def cached_split(root: str, size: int, augment: str, workers: int) -> tuple[CachedImages, float]:
    started = time.perf_counter()
    cached, _ = open_cached_split("caltech101", root, "train", {}, Preprocessing.for_size(size).resize,
                                  augmentation(augment, size), workers, crop=size)
    return cached, time.perf_counter() - started


class Step:
    """One training step of ``arch`` on ``device`` (AMP and channels_last as the trainer's defaults)."""

    def __init__(self, arch: str, classes: int, device: torch.device, amp: bool = True,
                 channels_last: bool = True, compile_model: bool = False, compile_mode: str | None = None,
                 fused: bool = False) -> None:
        self.device = device
        self.channels_last = channels_last and device.type in ("cuda", "cpu")
        self.model = build_model(arch, classes, "scratch").to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.forward = torch.compile(self.model, mode=compile_mode) if compile_model else self.model
        self.cuda_graphs = compile_model and compile_mode == "reduce-overhead"
        # fused: one kernel for the whole SGD update; None keeps PyTorch's default (foreach on CUDA)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, fused=fused or None)
        self.amp = autocast_dtype(device) if amp else None
        self.normalize = Normalizer(IMAGENET_MEAN, IMAGENET_STD, self.channels_last).to(device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.cuda_graphs:  # a new step: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        images = images.to(self.device, non_blocking=True)
        images = self.normalize(images)  # uint8 (or float 0..255 from strong batched augmentation)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = nn.functional.cross_entropy(self.forward(images).float(), labels.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_step(step: Step, batches: Batches) -> float:
    """Seconds for one training step, fetching its batch included."""
    step.sync()
    started = time.perf_counter()
    images, labels = next(batches)
    step(images, labels)
    step.sync()
    return time.perf_counter() - started


def loading_rate(batches: Batches, count: int, device: torch.device) -> float:
    """Images/s of the feed alone (no model)."""
    next(batches)  # first worker start, first upload
    gc.collect()  # else a full collection of the ~340k objects set-up left pending (~0.1 s) lands in the window
    started = time.perf_counter()
    n = sum(len(next(batches)[0]) for _ in range(count))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def random_batches(batch: int, size: int, device: torch.device) -> Batches:
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return iter(lambda: (images, labels), None)


def interleaved(contenders: dict[str, tuple[Step, Callable[[], Batches]]], steps: int) -> dict[str, float]:
    """Median training seconds per step of each contender, one step of each in turn (after a warm-up step)."""
    feeds = {name: (step, make()) for name, (step, make) in contenders.items()}
    for step, feed in feeds.values():  # warm-up: allocator, cuDNN autotune, compilation, first worker start
        timed_step(step, feed)
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(steps):
        for name, (step, feed) in feeds.items():
            times[name].append(timed_step(step, feed))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_size(args: argparse.Namespace, size: int, device: torch.device) -> dict[str, Any]:
    fresh_compiles()
    cached, build_s = cached_split(args.root, size, args.augment, args.workers)
    loader = DataLoader(cached, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    sampler = ShardedSampler(len(cached), seed=0, seeded=True)
    batched = DeviceBatches(cached, args.augment, size, args.batch, device, sampler, drop_last=True)
    step = Step(args.arch, 102, device)
    contenders: dict[str, tuple[Step, Callable[[], Batches]]] = {
        "memory": (step, lambda: random_batches(args.batch, size, device)),
        "cached": (step, lambda: forever(loader)),
        "device": (step, lambda: epochs_of(batched, sampler)),
    }
    if args.compile:
        contenders["compiled"] = (Step(args.arch, 102, device, compile_model=True),
                                  lambda: random_batches(args.batch, size, device))
    if args.decode:
        contenders["decode"] = (step, lambda: forever(decode_loader(args.root, size, args.batch, args.workers)))
    load = {name: loading_rate(make(), args.load_batches, device) for name, (_, make) in contenders.items()
            if name in ("cached", "device", "decode")}
    seconds = interleaved(contenders, args.steps)
    result: dict[str, Any] = {"rate": {name: args.batch / s for name, s in seconds.items()}, "load": load,
                              "build_s": build_s, "images": len(cached)}
    if args.trainer:
        result["rate"]["trainer"] = trainer_rate(args, size, device)
    return result


def trainer_rate(args: argparse.Namespace, size: int, device: torch.device) -> float:
    """The trainer's own images/s (its last epoch) on the same images, in a throw-away run store."""
    from core import paths
    from core.run_store import RunStore
    from train.config import parse_config
    from train.distributed import Dist
    from train.engine import train_run
    from train.jobs import prepare_run

    cache = paths.reslens_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="reslens-bench-trainer-"))
    (home / "cache").symlink_to(cache)  # the same image cache; runs and store stay in the temporary folder
    before = os.environ.get("RESLENS_HOME")
    os.environ["RESLENS_HOME"] = str(home)
    try:
        config = parse_config({
            "name": "throughput", "arch": args.arch, "seed": 0, "compile": args.compile, "data_path": args.data_path,
            "stages": [{"name": "bench", "dataset": "caltech101", "root": args.root, "epochs": args.trainer_epochs,
                        "batch_size": args.batch, "image_size": size, "augment": args.augment, "lr": 0.01,
                        "warmup_epochs": 0, "num_workers": args.workers}],
        })
        store = RunStore()
        name = prepare_run(config, store)
        train_run(config, name, Dist(0, 1, device), store, show_progress=False)
        return float(store.metrics(name, "epoch")[-1]["images_per_s"])
    finally:
        if before is None:
            os.environ.pop("RESLENS_HOME", None)
        else:
            os.environ["RESLENS_HOME"] = before
        shutil.rmtree(home, ignore_errors=True)


COLUMNS = ("memory", "compiled", "cached", "device", "decode", "trainer")


def report(size: int, r: dict[str, Any]) -> str:
    """One markdown row: training img/s per contender, ratios, the feeds alone, the cache build."""
    rate, load = r["rate"], r["load"]
    reference = "compiled" if "compiled" in rate else "memory"
    ratios = {f"{name}/memory": rate[name] / rate["memory"] for name in ("cached", "device", "compiled", "decode")
              if name in rate}
    if "trainer" in rate:
        ratios[f"trainer/{reference}"] = rate["trainer"] / rate[reference]
    cells = [str(size)] + [f"{rate[c]:.1f}" if c in rate else "-" for c in COLUMNS]
    cells += [f"{name} **{value:.2f}**" for name, value in ratios.items()]
    cells = cells[:len(COLUMNS) + 1] + ["; ".join(cells[len(COLUMNS) + 1:])]
    cells += [", ".join(f"{k} {v:,.0f}" for k, v in load.items()), f"{r['build_s']:.1f} s / {r['images']}"]
    return "| " + " | ".join(cells) + " |"


def header() -> str:
    names = ["size", *COLUMNS, "ratios", "load img/s (feed alone)", "cache build"]
    return "| " + " | ".join(names) + " |\n|" + " --- |" * len(names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/work/shared/data/caltech101-mini", help="holds caltech101/101_ObjectCategories")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="when --root holds no Caltech JPEGs: write N synthetic ones into a temporary folder")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per feed (the median step counts)")
    p.add_argument("--load-batches", type=int, default=10, help="batches timed for the feeds alone")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the JPEG feeds")
    p.add_argument("--augment", choices=("light", "strong"), default="light")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile'd reference (default: on CUDA only)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="include the decode-every-step feed")
    p.add_argument("--trainer", action="store_true", help="also time the trainer's own loop (train/engine.py)")
    p.add_argument("--trainer-epochs", type=int, default=2, help="the last one is timed (the first compiles)")
    p.add_argument("--data-path", choices=("auto", "workers", "device"), default="auto", help="the trainer's")
    p.add_argument("--fresh-cache", action="store_true", help="build the image cache in a temporary folder")
    variants = p.add_mutually_exclusive_group()
    variants.add_argument("--precision", action="store_true",
                          help="instead: compare fp32 / channels_last / mixed precision (amp) on in-memory batches")
    variants.add_argument("--speed-options", action="store_true",
                          help="instead: compare the fused optimizer, torch.compile and CUDA graphs (CUDA) on "
                               "in-memory batches")
    return p.parse_args(argv)


PRECISION = {"fp32": {"amp": False, "channels_last": False}, "channels_last": {"amp": False},
             "amp": {"channels_last": False}, "amp+channels_last": {}}


def speed_options(device: torch.device) -> dict[str, dict[str, Any]]:
    """The GPU defaults still to decide (issue 10), each a Step's options; the trainer's own default first.
    (cuDNN autotuning off cannot be timed beside it: cuDNN's plan cache, shared by the process, keeps the tuned
    plans whatever the flag says.)"""
    options: dict[str, dict[str, Any]] = {"eager": {}, "eager+fused": {"fused": True}}
    if device.type == "cuda":
        options = {"compiled": {"compile_model": True}, **options,
                   "compiled+fused": {"compile_model": True, "fused": True},
                   "compiled+cuda_graphs": {"compile_model": True, "compile_mode": "reduce-overhead"}}
    return options


def compare_steps(args: argparse.Namespace, size: int, device: torch.device,
                  variants: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Training img/s (memory feed) of one Step per variant (its options), steps taken in turn."""
    fresh_compiles()
    contenders = {name: (Step(args.arch, 102, device, **options), lambda: random_batches(args.batch, size, device))
                  for name, options in variants.items()}
    return {name: args.batch / s for name, s in interleaved(contenders, args.steps).items()}


def fresh_compiles() -> None:
    """Forget earlier compilations: a second input size of the same model code would otherwise be compiled with
    dynamic shapes (Dynamo's automatic dynamic), slower than the static ones the first size got."""
    torch._dynamo.reset()


def cuda_graph_skips() -> int:
    """How often Inductor fell back from CUDA graphs to plain kernels in this process (0 when it never did)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def print_variants(args: argparse.Namespace, device: torch.device, variants: dict[str, dict[str, Any]],
                   name: str) -> None:
    """One line per size: each variant's img/s and its ratio to the first variant's."""
    for size in args.sizes:
        rates = compare_steps(args, size, device, variants)
        base = next(iter(rates))
        print(f"{args.arch} {size} px, batch {args.batch}, {name}, amp dtype {autocast_dtype(device)}: " +
              ", ".join(f"{k} {v:.1f} img/s ({v / rates[base]:.2f}x {base})" for k, v in rates.items()), flush=True)
        skips = cuda_graph_skips()
        if skips:  # then "cuda_graphs" timed plain compiled kernels, at least in part
            print(f"note: Inductor skipped CUDA graphs {skips} time(s); TORCH_LOGS=perf_hints says why", flush=True)


def temporary_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the trainer sets it (fixed input sizes)
    if args.fresh_cache:
        os.environ["RESLENS_HOME"] = str(temporary_folder("reslens-bench-"))
    if args.synthetic and not (Path(args.root) / "caltech101" / "101_ObjectCategories").is_dir():
        args.root = str(write_synthetic_caltech(temporary_folder("reslens-bench-jpegs-"), args.synthetic))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    if args.precision or args.speed_options:
        print_variants(args, device, PRECISION if args.precision else speed_options(device), name)
        return
    print(f"{args.arch}, batch {args.batch}, augment {args.augment}, {args.steps} timed steps per feed (median), "
          f"workers {args.workers}, torch {torch.__version__}, {name}; training img/s per feed; "
          "goals: cached/memory >= 0.95, trainer/compiled >= 0.9", flush=True)
    print(header(), flush=True)  # a markdown table, for BENCHMARKS.md
    for size in args.sizes:
        print(report(size, bench_size(args, size, device)), flush=True)


if __name__ == "__main__":
    main()
