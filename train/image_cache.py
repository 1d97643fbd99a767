"""Decode every image once: a split cached as one uint8 array of resized, square images on disk.

Decoding JPEGs (or rendering synthetic images) every epoch can cost more than the training step
itself on a CPU. ``cached_pixels`` decodes a split once, resizes the short side to ``size`` and
centre-crops a ``size x size`` square (exactly what the evaluation transform does before its final
crop), and stores the result as ``<RESLENS_HOME>/cache/images/<key>.npy`` (N x 3 x size x size,
uint8). Later epochs and later runs memory-map that file. ``CachedImages`` then crops and flips
uint8 tensors per sample; normalisation happens on the device, batch-wise (``Normalizer``).

The cache key covers the data set name, root, split, options, size and the list of image sources;
editing an image file in place without renaming it is not detected (delete the cache folder then).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

from core import paths

CACHE_VERSION = 1


def cache_dir() -> Path:
    return paths.reslens_home() / "cache" / "images"


def cache_key(description: dict[str, Any], sources: Sequence[str]) -> str:
    """A stable name for one cached split (what was asked plus which images it holds)."""
    digest = hashlib.sha256(json.dumps({**description, "version": CACHE_VERSION}, sort_keys=True).encode())
    for source in sources:
        digest.update(source.encode() + b"\0")
    return digest.hexdigest()[:24]


class _Decoded(Dataset):
    """``dataset`` items as uint8 (3, size, size) tensors: short side resized to ``size``, centre-cropped."""

    def __init__(self, dataset: Any, size: int) -> None:
        self.dataset = dataset
        self.prepare = transforms.Compose([
            transforms.Resize(size, antialias=True), transforms.CenterCrop(size), transforms.PILToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.prepare(self.dataset.load_raw(index))


def decode_all(dataset: Any, size: int, out: np.ndarray, workers: int = 0) -> None:
    """Fill ``out`` (N x 3 x size x size uint8) with every image of ``dataset``, in order."""
    loader = DataLoader(_Decoded(dataset, size), batch_size=64, num_workers=workers)
    start = 0
    for batch in loader:
        out[start:start + len(batch)] = batch.numpy()
        start += len(batch)


def cached_pixels(dataset: Any, size: int, description: dict[str, Any], workers: int = 0,
                  build: bool = True) -> Path:
    """The path of the cached uint8 array of ``dataset`` at ``size``, building it when missing.

    With ``build=False`` the file must already exist (another DDP rank built it).
    """
    sources = [dataset.source(i) for i in range(len(dataset))]
    path = cache_dir() / f"{cache_key({**description, 'size': size}, sources)}.npy"
    if path.is_file() or not build:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(dataset), 3, size, size))
        decode_all(dataset, size, out, workers)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


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

    The array is memory-mapped lazily in each process, so DataLoader workers share the page cache.
    """

    def __init__(self, path: str | os.PathLike[str], targets: Sequence[int], transform: Any) -> None:
        self.path = Path(path)
        self.targets = list(targets)
        self.transform = transform
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        return self._pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.pixels()[index]))
        return self.transform(image), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the memory map
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


def open_cached_split(name: str, root: str | None, split: str, options: dict[str, Any], size: int,
                      transform: Any, workers: int = 0, build: bool = True) -> tuple[CachedImages, Any]:
    """``(CachedImages, the underlying LabeledImages)`` for one split of a registered data set."""
    from core.datasets import open_dataset

    dataset = open_dataset(name, root, split, **options)
    description = {"dataset": name, "root": str(root), "split": split, "options": options}
    path = cached_pixels(dataset, size, description, workers, build)
    return CachedImages(path, dataset.targets, transform), dataset
