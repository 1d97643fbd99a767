"""Images the app shows that are not uploads: built-in samples for Explain (one validation image per class of
the synthetic demo sets, as PNG bytes like an upload, so the page works with no files) and the images that
run-store rows name by their data-set ``source`` string (misclassified samples on the Classes page).
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

from PIL import Image

from core.images import load_image
from core.synthetic import ShapesDataset


@dataclass(frozen=True)
class Sample:
    """A built-in image: a label for pickers, its true class, and the PNG bytes."""

    label: str
    true_class: str
    png: bytes

    @property
    def filename(self) -> str:
        return self.label.replace(" ", "_").replace(":", "").replace("#", "") + ".png"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def builtin_samples(variant: str = "shapes-lt", per_class: int = 1) -> list[Sample]:
    """``per_class`` validation images of every class of a synthetic set (first ones, deterministic)."""
    data = ShapesDataset(variant, split="val")
    taken: dict[int, int] = {}
    samples: list[Sample] = []
    for i, target in enumerate(data.targets):
        if taken.get(target, 0) >= per_class:
            continue
        taken[target] = taken.get(target, 0) + 1
        name = data.classes[target]
        samples.append(Sample(f"{variant}: {name} #{i}", name, png_bytes(data.load_raw(i))))
    return samples


def load_source(source: str, root: str | os.PathLike[str] | None = None) -> Image.Image:
    """The image a data set's ``source(i)`` string names: ``name:split:index`` or a file path.

    Raises ``ImageError``/``DatasetMissing``/``DatasetError`` (user errors) when it cannot be read.
    """
    from core.datasets import DatasetError

    named = _data_set_image(source)
    if named is None:
        return load_image(source)
    name, split, index = named
    data = _opened(name, None if root is None else str(root), split)
    if index >= len(data):
        raise DatasetError(f"{source} names image {index} of the {name} {split} split, which has {len(data)} "
                           "images now: the data set changed since this result was stored.")
    return data.load_raw(index)


def missing_files(sources: list[str]) -> list[str]:
    """The sources that name image files no longer on disk (their data set was moved or deleted)."""
    return [s for s in sources if _data_set_image(s) is None and not os.path.exists(s)]


def _data_set_image(source: str) -> tuple[str, str, int] | None:
    """(data set, split, index) of a ``name:split:index`` source; None for a file path."""
    from core.datasets import DATASETS

    name, _, rest = source.partition(":")
    split, _, index = rest.partition(":")
    if name in DATASETS and split in ("train", "val") and index.isdigit():
        return name, split, int(index)
    return None


@functools.lru_cache(maxsize=8)
def _opened(name: str, root: str | None, split: str):  # type: ignore[no-untyped-def]
    from core.datasets import open_dataset

    return open_dataset(name, root, split)
