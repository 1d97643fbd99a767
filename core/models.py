"""ResNet models for ResLens and the preprocessing that travels with them."""
from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import transforms

from core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch -> (torchvision builder name, ImageNet weights enum name)
ARCHS: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": ("resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": ("resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
    "resnet101": ("resnet101", "ResNet101_Weights.IMAGENET1K_V2"),
}
INITS = ("scratch", "imagenet")  # or a path to a ResLens checkpoint


class ModelError(UserError, ValueError):
    """A model cannot be built as asked (unknown architecture, weights unavailable, mismatch)."""


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image into the model's input: resize the short side, centre-crop, normalise."""

    image_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def for_size(cls, image_size: int, crop_ratio: float = 0.875) -> "Preprocessing":
        """The usual evaluation recipe: resize to image_size / crop_ratio, then centre-crop image_size."""
        return cls(image_size=image_size, resize=int(round(image_size / crop_ratio)))

    def at_size(self, image_size: int) -> "Preprocessing":
        """The same recipe (normalisation, crop ratio 0.875) at another input size: test at a higher resolution."""
        return replace(self, image_size=image_size, resize=Preprocessing.for_size(image_size).resize)

    def eval_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.Resize(self.resize, antialias=True),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (x0, y0, x1, y1) of a width x height original that the model's input shows."""
        scale = self.resize / min(width, height)
        side = self.image_size / scale  # the crop's side in original pixels
        x0, y0 = (width - side) / 2, (height - side) / 2
        return (x0, y0, x0 + side, y0 + side)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(image_size=int(data["image_size"]), resize=int(data["resize"]),
                   mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                   extra=dict(data.get("extra") or {}))


def _weights(arch: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_weight(ARCHS[arch][1])


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps (or would keep) the ImageNet weights of ``arch``."""
    url = _weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_imagenet_weights(arch: str) -> None:
    """Make sure the ImageNet weights of ``arch`` are in torchvision's cache (downloaded when missing) and are the
    published file, else raise ``ModelError`` saying how to get them: before a run is made, not when its stage
    starts."""
    _check_cached_weights(arch)
    if not imagenet_weights_file(arch).is_file():
        _imagenet_state_dict(arch)


def _check_cached_weights(arch: str) -> None:
    """Refuse a cached weights file whose SHA-256 does not start with the prefix in its name (torch.hub's check,
    which it makes only when it downloads): a download cut short, or another file copied under that name. Nothing
    to check while the file is not there."""
    cached = imagenet_weights_file(arch)
    prefix = re.search(r"-([a-f0-9]+)\.", cached.name)
    if not prefix or not cached.is_file():
        return
    try:
        stat = cached.stat()
        digest = _sha256(str(cached), stat.st_size, stat.st_mtime_ns)
    except OSError as exc:
        raise ModelError(f"The cached ImageNet weights {cached} cannot be read: {exc.strerror or exc}.") from exc
    if not digest.startswith(prefix.group(1)):
        raise ModelError(
            f"The cached ImageNet weights {cached} are damaged or are not {arch}'s (their checksum does not match "
            f"the one in the file name): delete the file and it is downloaded again, or copy the right one there "
            f"from a machine that is online ({_weights(arch).url}).")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The SHA-256 of a file, once per (path, size, modification time): a launch checks it three times."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    cached = imagenet_weights_file(arch)
    _check_cached_weights(arch)
    try:  # reads the cache when the file is there, downloads it otherwise; weights only, never pickled code
        return _weights(arch).get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, refused, or a broken file: one sentence for the user
        raise ModelError(
            f"ImageNet weights for {arch} are not available: {cached.name} is not in the torchvision cache "
            f"{cached.parent} and could not be downloaded ({type(exc).__name__}). Copy the file there from a "
            f"machine that is online ({_weights(arch).url}), or use init 'scratch'."
        ) from exc


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a new, freshly initialised classification layer with ``num_classes`` outputs."""
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(arch: str = "resnet50", num_classes: int = 1000, init: str | os.PathLike[str] = "scratch",
                class_names: Sequence[str] | None = None) -> nn.Module:
    """A torchvision ResNet with ``num_classes`` outputs, initialised from scratch, ImageNet or a checkpoint.

    ``init`` is ``"scratch"``, ``"imagenet"`` or the path of a ResLens checkpoint; from ImageNet or a
    checkpoint, the backbone is kept and the head is kept only for the same classes in the same order
    (``class_names`` equal to the source's; without ``class_names``, the same count), else it is new: a stage on
    other classes never starts with logits wired to the previous stage's.
    """
    if arch not in ARCHS:
        raise ModelError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    if num_classes < 1:
        raise ModelError(f"A model needs at least one class, got num_classes={num_classes}.")
    builder = getattr(torchvision.models, ARCHS[arch][0])
    if init == "scratch":  # zero-initialised last BN of each block: each block starts as identity
        return builder(weights=None, num_classes=num_classes, zero_init_residual=True)
    model = builder(weights=None)
    if init == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
        source_names = list(_weights(arch).meta["categories"])
    else:
        from core.checkpoints import inference_weights, load_checkpoint, load_weights

        ckpt = load_checkpoint(init)
        if ckpt["arch"] != arch:
            raise ModelError(f"Checkpoint {init} holds a {ckpt['arch']}, but a {arch} was asked for.")
        replace_head(model, int(ckpt["num_classes"]))
        load_weights(model, inference_weights(ckpt), init)
        source_names = list(ckpt.get("class_names") or [None] * int(ckpt["num_classes"]))
    same = len(source_names) == num_classes and (class_names is None or list(class_names) == source_names)
    return model if same else replace_head(model, num_classes)
