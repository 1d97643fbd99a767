"""How a map's values become colours: each map on its own scale, or one scale shared by several maps.

The engine's maps (``explain(..., normalised=False)``) keep their magnitude. On its *own* scale a map is
min-max stretched to [0, 1], so every map spans the whole colormap, even for a class at 0.0% probability.
On a *shared* scale every map of one layer and method is divided by the largest value among them, so a map
that is weak next to the others looks weak (the raw map's magnitude).
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

SCALES = {
    "own": "Each map on its own scale (stretched to 0-1)",
    "shared": "One shared scale (the maps' magnitude, per layer)",
}


def own_scale(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    values = np.asarray(values, dtype=np.float32)
    low, span = float(values.min()), float(values.max() - values.min())
    return (values - low) / span if span > 0 else np.zeros_like(values)


def shared_scales(maps: Iterable[tuple[Hashable, np.ndarray]]) -> dict[Hashable, float]:
    """The largest magnitude per key (e.g. per layer) over all ``(key, map)`` pairs; 1.0 where all are zero."""
    scales: dict[Hashable, float] = {}
    for key, values in maps:
        scales[key] = max(scales.get(key, 0.0), float(np.abs(values).max()))
    return {key: (s if s > 0 else 1.0) for key, s in scales.items()}


def on_scale(values: np.ndarray, scale: float | None) -> np.ndarray:
    """Values for the colormap: own scale when ``scale`` is None, else ``values / scale`` clipped to [0, 1]."""
    if scale is None:
        return own_scale(values)
    return np.clip(np.asarray(values, dtype=np.float32) / scale, 0, 1)


def scale_label(scale: float | None) -> str:
    """What the colour bar's 0..1 means, for captions and colour bars."""
    if scale is None:
        return "own scale: each map stretched to 0-1"
    return f"shared scale: 1 = {scale:.3g}"
