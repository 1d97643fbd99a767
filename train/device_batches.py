"""Batch-wise augmentation on the device: the uint8 image cache gathered and augmented a batch at a time.

The per-sample path (``CachedImages`` + ``SeededItems`` in DataLoader workers) cannot keep a GPU
busy: thousands of crops and flips per second in Python. Here a split's uint8 cache is held once
(``PixelStore``: on the GPU when it fits, else gathered on the host from the memory map), a batch of
indices from the sampler is gathered in one indexing operation, and the same augmentations as
``image_cache.augmentation`` run on the whole batch:

* ``none``   — the centre crop (a slice);
* ``light``  — random crop + horizontal flip, one gather whose column index already holds the flip;
* ``strong`` — random resized crop (``torchvision.ops.roi_align``: bilinear, averaging over the source
               pixels a destination pixel covers, like an antialiased resize), flip, colour jitter
               (brightness, contrast, saturation in a random order per image).

Crop boxes, flips and jitter factors are drawn on the CPU, exactly as torchvision draws them per sample,
from a generator seeded by the seed ``ShardedSampler`` gives the batch's first sample (a function of the
pipeline seed, epoch and position in the epoch's order): a resumed epoch augments its remaining batches
exactly as the uninterrupted run, and the CPU and the GPU draw the same boxes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

from core.devices import to_device
from train.image_cache import CachedImages

RESIZED_SCALE = (0.25, 1.0)  # image_cache.augmentation("strong")'s RandomResizedCrop
RESIZED_RATIO = (3 / 4, 4 / 3)
JITTER = 0.3  # brightness, contrast and saturation factors drawn from [0.7, 1.3]
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
DEVICE_SHARE = 0.5  # the cache goes onto the GPU when it takes at most this share of its free memory
UPLOAD_ROWS = 1024  # rows copied to the GPU at a time (no second full copy in host memory)


@dataclass
class Boxes:
    """Per-image crop boxes ``(top, left, height, width)`` and horizontal flips (CPU tensors)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def _flips(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < 0.5


def _offsets(n: int, room: torch.Tensor | int, g: torch.Generator) -> torch.Tensor:
    """Uniform integers in ``[0, room]`` per image (``torch.randint(0, room + 1)`` for each)."""
    room = torch.as_tensor(room, dtype=torch.int64).expand(n)
    return (torch.rand(n, generator=g, dtype=torch.float64) * (room + 1)).floor().long().clamp(max=room)


def crop_boxes(n: int, source: int, size: int, g: torch.Generator) -> Boxes:
    """``RandomCrop(size)`` + ``RandomHorizontalFlip`` on ``source``-pixel squares, for ``n`` images."""
    full = torch.full((n,), size, dtype=torch.int64)
    return Boxes(_offsets(n, source - size, g), _offsets(n, source - size, g), full, full.clone(), _flips(n, g))


def resized_crop_boxes(n: int, source: int, g: torch.Generator, scale: Sequence[float] = RESIZED_SCALE,
                       ratio: Sequence[float] = RESIZED_RATIO, attempts: int = 10) -> Boxes:
    """``RandomResizedCrop``'s boxes on ``source``-pixel squares (10 tries each, else the whole image) + flips."""
    area = float(source * source)
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= source) & (h > 0) & (h <= source)
    first = torch.where(ok.any(1), ok.int().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    found = first >= 0
    height = torch.where(found, h.gather(1, pick)[:, 0], source)
    width = torch.where(found, w.gather(1, pick)[:, 0], source)
    top, left = _offsets(n, source - height, g), _offsets(n, source - width, g)
    return Boxes(top, left, height, width, _flips(n, g))


@dataclass
class Jitter:
    """Colour jitter factors per image (brightness, contrast, saturation) and the order they apply in."""

    factors: torch.Tensor  # (n, 3)
    order: torch.Tensor  # (n, 3): a permutation of 0, 1, 2 per image


def jitter_params(n: int, g: torch.Generator, strength: float = JITTER) -> Jitter:
    factors = torch.empty(n, 3).uniform_(1 - strength, 1 + strength, generator=g)
    return Jitter(factors, torch.rand(n, 3, generator=g).argsort(1))


def crop_flip(pixels: torch.Tensor, rows: torch.Tensor, boxes: Boxes, size: int) -> torch.Tensor:
    """Rows ``rows`` of ``pixels`` (N, 3, S, S), each cropped to its (size x size) box and flipped: one gather.

    The result is uint8 (B, 3, size, size) in channels_last memory layout.
    """
    device = pixels.device
    span = torch.arange(size, device=device)
    top, left, flip = to_device(torch.stack([boxes.top, boxes.left, boxes.flip.long()]), device)  # one copy
    ys = top[:, None] + span
    xs = left[:, None] + torch.where(flip[:, None].bool(), size - 1 - span, span)
    out = pixels[rows[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (B, size, size, 3)
    return out.permute(0, 3, 1, 2)


def resized_crop_flip(batch: torch.Tensor, boxes: Boxes, size: int) -> torch.Tensor:
    """Each image of ``batch`` (B, 3, S, S) cut to its box and resized to ``size`` (float, 0..255), then flipped."""
    b = boxes
    rois = torch.stack([torch.arange(len(batch)), b.left, b.top, b.left + b.width, b.top + b.height], dim=1)
    rois = to_device(rois.float(), batch.device)  # (index, x1, y1, x2, y2) per image: one small copy
    out = roi_align(batch.float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    flip = to_device(boxes.flip, batch.device)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def color_jitter(batch: torch.Tensor, jitter: Jitter) -> torch.Tensor:
    """``ColorJitter(brightness, contrast, saturation)`` on a float (B, 3, H, W) batch in 0..255, per image."""
    factors = to_device(jitter.factors, batch.device)[:, :, None, None, None]
    order = to_device(jitter.order, batch.device)
    x = batch
    for position in range(3):
        which = order[:, position]
        f = factors[torch.arange(len(x), device=x.device), which]  # (B, 1, 1, 1)
        pick = which[:, None, None, None]
        gray = _gray(x)  # blend towards black (brightness), mean gray (contrast) or gray (saturation)
        base = torch.where(pick == 0, 0.0, torch.where(pick == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
        x = (x * f + (1 - f) * base).clamp(0, 255)
    return x


def center_crop(pixels: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """``CenterCrop(size)`` of rows ``rows`` (torchvision's rounding of the offset)."""
    source = pixels.shape[-1]
    top = int(round((source - size) / 2.0))
    return pixels[rows, :, top:top + size, top:top + size]


def augment_batch(pixels: torch.Tensor, rows: torch.Tensor, kind: str, size: int,
                  g: torch.Generator | None) -> torch.Tensor:
    """Rows ``rows`` of the cached ``pixels`` augmented like ``image_cache.augmentation(kind, size)``."""
    if kind == "none":
        return center_crop(pixels, rows, size)
    assert g is not None, "random augmentations need a generator"
    source = pixels.shape[-1]
    if kind == "light":
        return crop_flip(pixels, rows, crop_boxes(len(rows), source, size, g), size)
    boxes = resized_crop_boxes(len(rows), source, g)
    jitter = jitter_params(len(rows), g)
    return color_jitter(resized_crop_flip(pixels[rows], boxes, size), jitter)


class PixelStore:
    """A split's cached uint8 pixels where gathering is cheapest: on the GPU when they fit, else on the host."""

    def __init__(self, images: CachedImages, device: torch.device) -> None:
        self.device = device
        array = images.pixels()
        self.copied = not _fits(array.nbytes, device)  # rows gathered on the host, copied (a GPU without room)
        with warnings.catch_warnings():  # the memory map is read-only and never written through this tensor
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(array) if isinstance(array, np.ndarray) else torch.as_tensor(array)
        self.pixels = host if self.copied or device.type == "cpu" else _upload(host, device)
        self.host_gather = HostGather(host, device) if self.copied else None
        self.rows = torch.as_tensor(images.rows, dtype=torch.int64)
        self.device_rows = self.rows.to(device)
        self.targets = torch.as_tensor(images.targets, dtype=torch.int64, device=device)

    def batch(self, indices: Sequence[int], kind: str, size: int,
              g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` augmented on the device (host-held rows are copied over first), and their labels."""
        on_device = to_device(torch.tensor(indices, dtype=torch.int64), self.device)
        labels = self.targets[on_device]
        if not self.copied:
            return augment_batch(self.pixels, self.device_rows[on_device], kind, size, g), labels
        batch = self.host_gather.gather(self.rows[torch.tensor(indices, dtype=torch.int64)])
        return augment_batch(batch, torch.arange(len(batch), device=self.device), kind, size, g), labels


class HostGather:
    """Rows of a host-held cache gathered straight into one of two reused buffers (pinned for a GPU), then copied
    to the device without blocking: one host copy per batch. A buffer is refilled only after the GPU has read it
    (an event per buffer), so the host runs at most two batches ahead of those copies."""

    def __init__(self, pixels: torch.Tensor, device: torch.device) -> None:
        self.pixels, self.device = pixels, device
        self.buffers = [pixels.new_empty((0, *pixels.shape[1:])) for _ in range(2)]
        self.read: list[Any] = [None, None]  # per buffer: the CUDA event after the copy that last read it
        self.turn = 1

    def fill(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` gathered into the next buffer (allocated only when a batch outgrows it)."""
        self.turn = k = 1 - self.turn
        if self.read[k] is not None:
            self.read[k].synchronize()  # its last copy to the GPU has finished: safe to overwrite
        if len(self.buffers[k]) < len(rows):
            self.buffers[k] = torch.empty((len(rows), *self.pixels.shape[1:]), dtype=self.pixels.dtype,
                                          pin_memory=self.device.type == "cuda")
        return torch.index_select(self.pixels, 0, rows, out=self.buffers[k][:len(rows)])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` on the device, in a tensor of their own."""
        host = self.fill(rows)
        if self.device.type != "cuda":  # tests gather a CPU's rows here too: the batch must outlive the buffer
            return host.clone()
        batch = host.to(self.device, non_blocking=True)
        self.read[self.turn] = torch.cuda.Event()
        self.read[self.turn].record(torch.cuda.current_stream(self.device))
        return batch


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    for start in range(0, len(host), UPLOAD_ROWS):
        out[start:start + UPLOAD_ROWS].copy_(host[start:start + UPLOAD_ROWS])
    return out


class DeviceBatches:
    """An epoch's ``(images, labels)`` batches on ``device``, gathered and augmented batch-wise.

    With a ``ShardedSampler``, its epoch's indices, each batch's random draws coming from a generator seeded
    with the seed of the batch's first sample (``seed_at``: one hash per batch, the seed the per-sample path
    gives that sample); without one, the items in order (validation). ``len`` and ``drop_last`` behave as a
    DataLoader's.
    """

    def __init__(self, images: CachedImages, kind: str, size: int, batch_size: int, device: torch.device,
                 sampler: Any = None, drop_last: bool = False) -> None:
        self.images, self.kind, self.size, self.batch_size = images, kind, size, batch_size
        self.sampler, self.drop_last = sampler, drop_last
        self.store = PixelStore(images, device)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.sampler
        items = list(range(len(self.images))) if sampler is None else sampler.indices()
        for k in range(len(self)):
            start = k * self.batch_size
            g = torch.Generator().manual_seed(sampler.seed_at(start)) if sampler is not None else None
            yield self.store.batch(items[start:start + self.batch_size], self.kind, self.size, g)


def use_device_path(data_path: str, device: torch.device) -> bool:
    """Whether a run's ``data_path`` (auto, workers, device) means batches augmented on the device."""
    return data_path == "device" or (data_path == "auto" and device.type == "cuda")
