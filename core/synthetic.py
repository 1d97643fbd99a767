"""Built-in demo data sets: procedurally generated shapes on cluttered backgrounds, no files needed.

Two variants, both deterministic functions of (variant, seed, index), the same on every machine:

- ``shapes``: 10 shape classes, balanced (the pretraining set of the demo pipeline).
- ``shapes-lt``: 10 classes (half of them new shapes) whose sizes follow a Caltech-like long tail,
  largest/smallest = 25 (the fine-tuning set; the Classes page has a real imbalance to show).

Each image holds exactly one object (random kind-specific shape, position, scale, rotation and colour)
over a cluttered background (colour gradient, random lines and specks, noise). The object's bounding
box is known for every image (``boxes``), so Grad-CAM localisation can be measured.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from core.datasets import LabeledImages

RAW_SIZE = 64  # side of the generated images, in pixels

Point = tuple[float, float]


def _regular(n: int, phase: float = -math.pi / 2) -> list[Point]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    outer = _regular(2 * points)
    return [(x * (1 if k % 2 == 0 else inner), y * (1 if k % 2 == 0 else inner)) for k, (x, y) in enumerate(outer)]


def _arc(r: float, a0: float, a1: float, n: int = 24) -> list[Point]:
    return [(r * math.cos(a0 + (a1 - a0) * k / (n - 1)), r * math.sin(a0 + (a1 - a0) * k / (n - 1))) for k in range(n)]


def _heart() -> list[Point]:
    ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return [(x / 17.0, y / 17.0) for x, y in zip(xs, ys)]


# Each shape is a list of polygons in the unit square [-1, 1]^2; a polygon drawn with fill=None is a hole.
POLYGONS: dict[str, list[tuple[list[Point], bool]]] = {
    "circle": [(_regular(32), True)],
    "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], True)],
    "triangle": [(_regular(3), True)],
    "star": [(_star(), True)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], True)],
    "ring": [(_regular(32), True), ([(0.55 * x, 0.55 * y) for x, y in _regular(32)], False)],
    "frame": [([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], True),
              ([(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)], False)],
    "semicircle": [(_arc(1.0, 0, math.pi) + [(-1.0, 0.0)], True)],
    "bar": [([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)], True)],
    "hourglass": [([(-0.8, -1), (0.8, -1), (0, 0), (0.8, 1), (-0.8, 1), (0, 0)], True)],
    "heart": [(_heart(), True)],
    "arrow": [([(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)], True)],
    "crescent": [(_regular(32), True), ([(0.45 + 0.85 * x, -0.1 + 0.85 * y) for x, y in _regular(32)], False)],
    "tee": [([(-1, -1), (1, -1), (1, -0.45), (0.3, -0.45), (0.3, 1), (-0.3, 1), (-0.3, -0.45), (-1, -0.45)], True)],
    "ell": [([(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)], True)],
}


@dataclass(frozen=True)
class Variant:
    classes: tuple[str, ...]
    sizes: tuple[int, ...]  # images per class (train + val)
    seed_salt: str
    patterns: tuple[str, ...]  # the fill texture of each class


def _long_tail(n_max: int, ratio: float, n_classes: int) -> tuple[int, ...]:
    """Class sizes decaying geometrically from n_max to n_max/ratio (Caltech-like long tail)."""
    return tuple(int(round(n_max * ratio ** (-k / (n_classes - 1)))) for k in range(n_classes))


VAL_FRACTION = 0.2


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _split_indices(variant: Variant, seed: int) -> dict[str, list[tuple[int, int]]]:
    """(class, item) pairs of each split: a seeded, stratified VAL_FRACTION of every class is held out."""
    splits: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    for c, n in enumerate(variant.sizes):
        order = _rng(variant.seed_salt, seed, "split", c).permutation(n)
        n_val = max(1, int(round(VAL_FRACTION * n)))
        splits["val"] += [(c, int(i)) for i in sorted(order[:n_val])]
        splits["train"] += [(c, int(i)) for i in sorted(order[n_val:])]
    return splits


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = c0 * (1 - t) + c1 * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    img = np.broadcast_to(grad, (size, size, 3)).copy()
    img += rng.normal(0, 8, img.shape)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 7))):  # clutter: thin lines and specks, never a class shape
        xy = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=1)
    for _ in range(int(rng.integers(5, 15))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 1.5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    return canvas


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(255 * c) for c in rgb)  # type: ignore[return-value]


# Fill textures, as functions of pixel coordinates: each class has its own (real object classes have
# characteristic textures too), so a network trained from scratch picks the classes up within minutes.
PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda x, y: np.ones_like(x, bool),
    "hstripes": lambda x, y: (y // 3) % 2 == 0,
    "vstripes": lambda x, y: (x // 3) % 2 == 0,
    "diagonal": lambda x, y: ((x + y) // 3) % 2 == 0,
    "antidiagonal": lambda x, y: ((x - y) // 3) % 2 == 0,
    "checker": lambda x, y: ((x // 3) + (y // 3)) % 2 == 0,
    "dots": lambda x, y: ~((x % 4 < 2) & (y % 4 < 2)),
    "grid": lambda x, y: (x % 5 != 0) & (y % 5 != 0),
    "wide-hstripes": lambda x, y: (y // 6) % 2 == 0,
    "wide-vstripes": lambda x, y: (x // 6) % 2 == 0,
}


def _fill(pattern: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int) -> Image.Image:
    """A size x size image of ``pattern`` in ``colour`` and a dark shade of it, at a random phase."""
    y, x = np.mgrid[0:size, 0:size] + rng.integers(0, 12, 2)[:, None, None]
    on = PATTERNS[pattern](x, y)
    light = np.array(colour, float)
    pixels = np.where(on[..., None], light, light * 0.35)
    return Image.fromarray(pixels.astype(np.uint8))


def render(shape: str, rng: np.random.Generator, size: int = RAW_SIZE,
           pattern: str = "solid") -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw one ``shape`` filled with ``pattern`` on a cluttered background; return it and the object's box."""
    canvas = _background(rng, size)
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    angle = rng.uniform(-math.pi / 6, math.pi / 6)
    cos, sin = math.cos(angle), math.sin(angle)
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    xs: list[float] = []
    ys: list[float] = []
    for points, solid in POLYGONS[shape]:  # a polygon that is not solid is a hole
        poly = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]
        draw.polygon(poly, fill=255 if solid else 0)
        if solid:
            xs += [p[0] for p in poly]
            ys += [p[1] for p in poly]
    canvas.paste(_fill(pattern, _object_colour(rng), rng, size), (0, 0), mask)
    box = (max(0, int(math.floor(min(xs)))), max(0, int(math.floor(min(ys)))),
           min(size, int(math.ceil(max(xs))) + 1), min(size, int(math.ceil(max(ys))) + 1))
    return canvas, box


VARIANTS: dict[str, Variant] = {
    "shapes": Variant(
        ("circle", "square", "triangle", "star", "cross", "ring", "frame", "semicircle", "bar", "crescent"),
        (200,) * 10, "shapes", tuple(PATTERNS)),
    "shapes-lt": Variant(
        ("heart", "arrow", "circle", "tee", "star", "hourglass", "square", "ell", "triangle", "cross"),
        _long_tail(250, 25.0, 10), "shapes-lt",
        ("checker", "wide-vstripes", "dots", "solid", "hstripes", "grid", "diagonal", "vstripes",
         "wide-hstripes", "antidiagonal")),
}

class ShapesDataset(LabeledImages):
    """A synthetic demo data set with known object boxes."""

    def __init__(self, variant: str = "shapes", split: str = "train", transform: Callable | None = None,
                 seed: int = 0, image_size: int = RAW_SIZE) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"Unknown synthetic data set {variant!r}; choose one of {sorted(VARIANTS)}.")
        if split not in ("train", "val"):
            raise ValueError(f"Unknown split {split!r} for {variant}; choose 'train' or 'val'.")
        self.variant, self.split, self.seed, self.image_size = variant, split, seed, image_size
        self._spec = VARIANTS[variant]
        self._items = _split_indices(self._spec, seed)[split]
        super().__init__(self._spec.classes, [c for c, _ in self._items], transform)
        self._boxes: dict[int, tuple[int, int, int, int]] = {}

    def _render(self, i: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
        c, item = self._items[i]
        rng = _rng(self._spec.seed_salt, self.seed, "image", c, item)
        return render(self.classes[c], rng, self.image_size, self._spec.patterns[c])

    def load_raw(self, i: int) -> Image.Image:
        """The RGB image at index ``i`` at its generated resolution."""
        image, box = self._render(i)
        self._boxes[i] = box
        return image

    def box(self, i: int) -> tuple[int, int, int, int]:
        """The object's bounding box (x0, y0, x1, y1) in pixels of ``load_raw(i)``."""
        if i not in self._boxes:
            self.load_raw(i)
        return self._boxes[i]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [self.box(i) for i in range(len(self))]

    def source(self, i: int) -> str:
        return f"{self.variant}:{self.split}:{i}"


def shapes_class_counts(variant: str, split: str = "train", seed: int = 0) -> dict[str, int]:
    """Images per class of a synthetic split, without rendering anything."""
    spec = VARIANTS[variant]
    counts = dict.fromkeys(spec.classes, 0)
    for c, _ in _split_indices(spec, seed)[split]:
        counts[spec.classes[c]] += 1
    return counts
