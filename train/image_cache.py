"""Decode every image once: a split cached as one uint8 array of resized, square images on disk.

Decoding JPEGs (or rendering synthetic images) every epoch can cost more than the training step
itself on a CPU. ``cached_pixels`` decodes a split once, resizes the short side to ``size`` and
crops a ``size x size`` square placed so that its centre crop of the model's input size is exactly the
evaluation transform's (``Resize`` then ``CenterCrop``: cropping twice, each offset rounded, would shift it a pixel),
and stores the result as ``<RESLENS_HOME>/cache/images/<key>.npy`` (N x 3 x size x size,
uint8). Later epochs and later runs memory-map that file. ``CachedImages`` then crops and flips
uint8 tensors per sample (``data_path: workers``; ``train/device_batches.py`` does the same batch-wise on the
device); normalisation happens on the device, batch-wise (``Normalizer``).

The cache key covers the data set name, root, split, options, size, crop and the list of image sources with each
file's size and modification time, so an image replaced or edited in place gets a new cache (runs that are
training keep their memory maps and finish). A side file ``<key>.json`` records the shape, size
and a fingerprint of the pixels; a cache file that is truncated, damaged, swapped or overwritten is rebuilt
with one line saying so. Before a build the space it needs is checked and reserved (``posix_fallocate``), so a
full disk is one sentence (``CacheError``), never a SIGBUS; partial files of dead builders are swept.
With ``options.skip_unreadable`` images that cannot be decoded are left out and listed instead of failing.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

from core import paths
from core.sizes import iec_bytes
from core.errors import UserError
from core.images import ImageError
from core.tempfiles import locked_temp, sweep_stale
from train.signals import start_workers, worker_init_fn

CACHE_VERSION = 3  # 3: the square is placed for the final centre crop
FINGERPRINT_BYTES = 64 << 20  # rows hashed by the fingerprint: every row of caches up to 64 MB, else a spread
SPACE_MARGIN = 4 << 20  # left free after a build, so the run store can still record what happened


class CacheError(UserError):
    """The image cache cannot be built (no space, ...); the message says what, how much and where."""


def cache_dir() -> Path:
    return paths.reslens_home() / "cache" / "images"


def cache_key(description: dict[str, Any], sources: Sequence[str]) -> str:
    """A stable name for one cached split: what was asked, plus which images it holds and, for image files, their
    size and modification time (an image edited in place gets a new cache)."""
    digest = hashlib.sha256(json.dumps({**description, "version": CACHE_VERSION}, sort_keys=True).encode())
    for source in sources:
        digest.update(source.encode() + b"\0" + _file_stamp(source))
    return digest.hexdigest()[:24]


def _file_stamp(source: str) -> bytes:
    """Size and modification time of an image file; nothing for other sources (a synthetic image's index)."""
    try:
        stat = os.stat(source)
    except (OSError, ValueError):
        return b""
    return f"{stat.st_size}:{stat.st_mtime_ns}\0".encode()


def square_start(length: int, side: int, crop: int | None) -> int:
    """Where a ``side``-long square starts on a resized image's axis of ``length`` so that the square's centre crop
    of ``crop`` is the image's own (torchvision's ``CenterCrop`` offset, ``round((length - crop) / 2)``)."""
    crop = side if crop is None else crop
    start = int(round((length - crop) / 2.0)) - int(round((side - crop) / 2.0))
    return min(max(start, 0), length - side)


class _Decoded(Dataset):
    """``dataset`` items as ``(uint8 (3, size, size) tensor, readable)``: short side resized to ``size``, a square
    cut whose centre ``crop`` is the image's (``square_start``); with ``skip_unreadable`` an image that cannot be
    decoded is a blank row, not an error."""

    def __init__(self, dataset: Any, size: int, skip_unreadable: bool = False, crop: int | None = None) -> None:
        self.dataset, self.size, self.skip_unreadable, self.crop = dataset, size, skip_unreadable, crop
        self.resize = transforms.Resize(size, antialias=True)

    def prepare(self, image: Any) -> torch.Tensor:
        image = self.resize(image)
        left, top = (square_start(n, self.size, self.crop) for n in image.size)
        return transforms.functional.pil_to_tensor(image.crop((left, top, left + self.size, top + self.size)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.prepare(self.dataset.load_raw(index)), True
        except ImageError as exc:
            if not self.skip_unreadable:
                raise ImageError(f"{exc} A stage with options: {{skip_unreadable: true}} leaves out (and lists) the "
                                 "images that cannot be decoded.") from None
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def decode_all(dataset: Any, size: int, out: np.ndarray, workers: int = 0, skip_unreadable: bool = False,
               check: Callable[[], None] | None = None, crop: int | None = None) -> list[int]:
    """Fill ``out`` (N x 3 x size x size uint8) with every image of ``dataset``, in order (squares placed for a
    centre ``crop``); return the indices of the unreadable images skipped (``skip_unreadable``). ``check`` runs after
    every batch (it may raise to stop the build)."""
    loader = DataLoader(_Decoded(dataset, size, skip_unreadable, crop), batch_size=32, num_workers=workers,
                        worker_init_fn=worker_init_fn())
    start, skipped = 0, []
    for batch, readable in start_workers(loader):
        out[start:start + len(batch)] = batch.numpy()
        skipped += [start + i for i in torch.nonzero(~readable).flatten().tolist()]
        start += len(batch)
        if check is not None:
            check()
    return skipped


@dataclass
class CachedSplit:
    """A built cache file and what its side file says about it."""

    path: Path
    skipped: list[int]


def cached_pixels(dataset: Any, size: int, description: dict[str, Any], workers: int = 0, build: bool = True,
                  check: Callable[[], None] | None = None) -> CachedSplit:
    """The cached uint8 array of ``dataset`` at ``size``, built when missing or damaged (one line says so).

    With ``build=False`` the file must already exist (another DDP rank built it). ``description`` may hold
    ``options.skip_unreadable``: images that cannot be decoded are then left out (and listed) instead of
    failing the build; and ``crop``, the model's input size the squares are placed for (``square_start``).
    """
    path, sources = _cache_path(dataset, size, description)
    shape = (len(dataset), 3, size, size)
    if not build:
        _mark_used(path)
        return CachedSplit(path, _read_side(path).get("skipped", []))
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_builds()
    problem = cache_problem(path, shape) if path.exists() else "missing"
    if problem is None:
        skipped = list(_read_side(path).get("skipped", []))
        _mark_used(path)
    else:
        if problem != "missing":
            print(f"Image cache {path} is damaged ({problem}); rebuilding it.", file=sys.stderr, flush=True)
        skip = bool((description.get("options") or {}).get("skip_unreadable"))
        skipped = _build(dataset, size, path, shape, workers, skip, check, description)
    for i in skipped:  # in every run's log, not only the one that built the cache
        print(f"Skipped unreadable image {sources[i]}.", file=sys.stderr, flush=True)
    return CachedSplit(path, skipped)


def swept_sentence(freed: int) -> str:
    """What ``sweep_stale_builds`` did, for the cache command and the Train page."""
    return f"Removed the partial files of cache builds whose process died: freed {iec_bytes(freed)}."


def sweep_stale_builds() -> int:
    """Remove partial cache files whose builder died (SIGKILL, power loss); live builds keep theirs. The bytes
    freed (a build reserves its whole size at its start)."""
    sizes = {}
    for path in cache_dir().glob(".build-*.npy") if cache_dir().is_dir() else []:
        try:
            sizes[path] = path.stat().st_size
        except FileNotFoundError:
            continue
    return sum(sizes.get(path, 0) for path in sweep_stale(cache_dir(), ".build-*.npy"))


def _build(dataset: Any, size: int, path: Path, shape: tuple[int, ...], workers: int, skip: bool,
           check: Callable[[], None] | None, description: dict[str, Any]) -> list[int]:
    header = _header_bytes(shape)
    needed = header + int(np.prod(shape))
    _check_space(path.parent, needed, description)
    fd, tmp = locked_temp(path.parent, prefix=".build-", suffix=".npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)  # sparse until written
        _reserve(fd, needed, path.parent, description)
        skipped = decode_all(dataset, size, out, workers, skip, check, description.get("crop"))
        out.flush()
        side = {"shape": list(shape), "dtype": "uint8", "bytes": needed, "fingerprint": _fingerprint(out),
                "skipped": skipped, "description": {**description, "size": size}}
        del out
        _side(path).write_text(json.dumps(side))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)
    return skipped


def counts_without_skipped(name: str, root: str | None, options: dict[str, Any], size: int,
                           crop: int | None = None) -> list[int]:
    """Images per class of a train split as its runs saw it: without the unreadable ones its cache build (at
    ``size``, for ``crop``) left out; every image counts while that split is not cached."""
    from core.datasets import open_dataset

    dataset = open_dataset(name, root, "train", **options)
    path, _ = _cache_path(dataset, size, _description(name, root, "train", options, crop))
    skipped = set(_read_side(path).get("skipped", [])) if path.exists() else set()
    counts = [0] * len(dataset.classes)
    for i, target in enumerate(dataset.targets):
        counts[target] += i not in skipped
    return counts


def _description(name: str, root: str | None, split: str, options: dict[str, Any],
                 crop: int | None = None) -> dict[str, Any]:
    """What a cached split is of (with its size and images, this names its file)."""
    return {"dataset": name, "root": str(root), "split": split, "options": options, "crop": crop}


def _cache_path(dataset: Any, size: int, description: dict[str, Any]) -> tuple[Path, list[str]]:
    """Where ``dataset``'s pixels at ``size`` are cached, and the image sources its name is made of."""
    sources = [dataset.source(i) for i in range(len(dataset))]
    return cache_dir() / f"{cache_key({**description, 'size': size}, sources)}.npy", sources


@dataclass(frozen=True)
class CacheEntry:
    """One cached split on disk: what it holds, its size and when a run last used it."""

    path: Path
    size: int  # bytes on disk, side file included
    what: str
    last_used: float  # seconds since the epoch


def cache_entries() -> list[CacheEntry]:
    """Every cached split under the ResLens home, the most recently used first (builds in progress left out)."""
    folder = cache_dir()
    entries = []
    for path in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            stat = path.stat()
            side_stat = _side(path).stat() if _side(path).exists() else None
        except FileNotFoundError:  # cleared meanwhile
            continue
        size, last_used = stat.st_size, side_stat.st_mtime if side_stat else stat.st_mtime
        entries.append(CacheEntry(path, size + (side_stat.st_size if side_stat else 0), _label(_read_side(path)),
                                  last_used))
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def remove_cache(entry: CacheEntry) -> int:
    """Delete one cached split (runs training on it keep their memory maps); the bytes freed."""
    freed = 0
    for path in (entry.path, _side(entry.path)):
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
    return freed


def _label(side: dict[str, Any]) -> str:
    """What a cache file holds, in words: data set, split, size and images."""
    if not side:
        return "no description file (damaged or unfinished): rebuilt when a run needs it"
    about, shape = side.get("description"), side.get("shape") or [0, 0, 0, 0]
    images = f"{int(shape[0]) - len(side.get('skipped', [])):,} images cached at {shape[-1]} px"
    if not isinstance(about, dict):
        return f"{images} (built by an older ResLens, which did not record the data set)"
    options = ", ".join(f"{k}={v}" for k, v in sorted((about.get("options") or {}).items()))
    older = "" if "crop" in about else " (built by an older ResLens: no run uses it now)"  # before CACHE_VERSION 3
    return f"{_what(about)}, {images}, root {about.get('root')}" + (f", {options}" if options else "") + older


def _mark_used(path: Path) -> None:
    """Record that a run uses the cache now (the side file's modification time), for ``cache_entries``."""
    try:
        os.utime(_side(path))
    except OSError:
        pass  # a read-only cache folder still serves


def _header_bytes(shape: tuple[int, ...]) -> int:
    """Size of the ``.npy`` header ``open_memmap`` writes for a uint8 array of ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return len(buffer.getvalue())


def _what(description: dict[str, Any]) -> str:
    return f"{description.get('dataset', 'the data set')} ({description.get('split', '?')})"


def _no_space(folder: Path, needed: int, description: dict[str, Any]) -> CacheError:
    return CacheError(
        f"Not enough disk space to build the image cache of {_what(description)}: it needs {iec_bytes(needed)} in "
        f"{folder}, which has {iec_bytes(shutil.disk_usage(folder).free)} free; free some space or point "
        "RESLENS_HOME at a larger disk."
    )


def _check_space(folder: Path, needed: int, description: dict[str, Any]) -> None:
    if shutil.disk_usage(folder).free < needed + SPACE_MARGIN:
        raise _no_space(folder, needed + SPACE_MARGIN, description)


def _reserve(fd: int, needed: int, folder: Path, description: dict[str, Any]) -> None:
    """Allocate every block now: writing a memory map on a full disk is a SIGBUS, not an error."""
    try:
        os.posix_fallocate(fd, 0, needed)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(folder, needed, description) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # else: a file system without fallocate
            raise


def _side(path: Path) -> Path:
    """The side file holding a cache file's shape, fingerprint and skipped images."""
    return path.with_suffix(".json")


def _read_side(path: Path) -> dict[str, Any]:
    try:
        side = json.loads(_side(path).read_text())
    except (OSError, ValueError):
        return {}
    return side if isinstance(side, dict) else {}


def _fingerprint(pixels: np.ndarray) -> str:
    """A hash of every row (or, for caches over ``FINGERPRINT_BYTES``, of rows spread evenly over the file)."""
    n = len(pixels)
    row = pixels[0].nbytes if n else 1
    count = max(1, min(n, FINGERPRINT_BYTES // row))
    digest = hashlib.blake2b(digest_size=16)
    for i in np.unique(np.linspace(0, max(0, n - 1), count).astype(np.int64)) if n else []:
        digest.update(np.ascontiguousarray(pixels[i]).data)
    return digest.hexdigest()


def cache_problem(path: Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache file at ``path`` cannot be used for an array of ``shape`` (None when it can)."""
    side = _read_side(path)
    if not side:
        return "its description file is missing or unreadable"
    if not path.is_file():
        return "the file is missing"
    try:
        pixels = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds (ValueError, EOFError, tokenize errors)
        return f"unreadable: {type(exc).__name__}"
    if pixels.dtype != np.uint8 or tuple(pixels.shape) != tuple(shape):
        return f"holds {pixels.dtype} {tuple(pixels.shape)} instead of uint8 {tuple(shape)}"
    if path.stat().st_size != side.get("bytes") or side.get("shape") != list(shape):
        return "its size differs from the one recorded when it was built"
    if _fingerprint(pixels) != side.get("fingerprint"):
        return "its pixels differ from the ones recorded when it was built"
    return None


def augmentation(kind: str, image_size: int) -> v2.Transform:
    """Per-sample augmentation on uint8 (3, S, S) tensors: none, light or strong."""
    if kind == "none":
        return v2.CenterCrop(image_size)
    if kind == "light":
        return v2.Compose([v2.RandomCrop(image_size), v2.RandomHorizontalFlip()])
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    ])


class CachedImages(Dataset):
    """Items ``(uint8 (3, image_size, image_size) tensor, target)`` read from a cached array.

    The array is memory-mapped when the object is made: the mapping keeps the file's data even if the
    cache folder is deleted mid-run, and forked DataLoader workers share it. ``rows`` are the rows used
    (all but skipped unreadable images); ``source(i)`` names where item ``i`` came from.
    """

    def __init__(self, path: str | os.PathLike[str], targets: Sequence[int], transform: Any,
                 rows: Sequence[int] | None = None, source: Callable[[int], str] | None = None) -> None:
        self.path = Path(path)
        self.rows = list(range(len(targets)) if rows is None else rows)
        self.targets = [targets[r] for r in self.rows]
        self.transform = transform
        self._source = source
        self._pixels: np.ndarray | None = None
        if self.path.exists():
            self.pixels()

    def __len__(self) -> int:
        return len(self.targets)

    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        return self._pixels

    def source(self, index: int) -> str:
        return self._source(self.rows[index]) if self._source is not None else f"{self.path}:{self.rows[index]}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.pixels()[self.rows[index]]))
        return self.transform(image), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:  # spawned workers reopen the memory map
        return {**self.__dict__, "_pixels": None}


class Normalizer(torch.nn.Module):
    """uint8 batch on the device -> float, scaled to [0, 1] and normalised (optionally channels_last)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)
        self.channels_last = channels_last

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _say_emptied_classes(dataset: Any, split: str, skipped: set[int], rows: list[int]) -> None:
    """One line for classes left with no image of the split because every one of them was skipped."""
    if not skipped:
        return
    emptied = sorted({dataset.targets[i] for i in skipped} - {dataset.targets[i] for i in rows})
    for target in emptied:
        print(f"Every {split} image of class {dataset.classes[target]} was unreadable and skipped: the class has no "
              f"{split} image left.", file=sys.stderr, flush=True)


def open_cached_split(name: str, root: str | None, split: str, options: dict[str, Any], size: int,
                      transform: Any, workers: int = 0, build: bool = True,
                      check: Callable[[], None] | None = None, opened: Any = None,
                      crop: int | None = None) -> tuple[CachedImages, Any]:
    """``(CachedImages, the underlying LabeledImages)`` for one split of a registered data set.

    ``check`` runs after every decoded batch of a build (it may raise to stop it); ``opened`` is the split already
    opened with ``core.datasets.open_dataset`` (its classes checked before anything is decoded); ``crop``: the
    model's input size, whose centre crop of a cached square is then exactly the evaluation transform's.
    """
    from core.datasets import open_dataset

    dataset = opened if opened is not None else open_dataset(name, root, split, **options)
    cached = cached_pixels(dataset, size, _description(name, root, split, options, crop), workers, build, check)
    skipped = set(cached.skipped)
    rows = [i for i in range(len(dataset)) if i not in skipped]
    _say_emptied_classes(dataset, split, skipped, rows)
    return CachedImages(cached.path, dataset.targets, transform, rows, dataset.source), dataset
