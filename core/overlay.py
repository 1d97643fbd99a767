"""Colour-mapped overlays of class-activation maps on the ORIGINAL image, as PNG bytes, with a colour bar.

A map is computed on the model's input: the original resized (short side) and centre-cropped
(``Preprocessing``). ``overlay`` maps it back into exactly that crop's region of the original, at the
original's resolution and aspect ratio; the rest of the image is left as it is (nothing is stretched).

Colormaps (``COLORMAPS``) are OpenCV's, plus ``coolwarm``, a diverging blue-white-red table for signed maps
(applied through ``cv2.applyColorMap`` with a user table). A colour bar under the image says what the colours
mean: 0 = low to 1 = high importance, or, for signed (raw) maps, -s (against the class) .. 0 .. +s (for it).
"""
from __future__ import annotations

import math
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from core.errors import UserError

MAX_SHOWN_RATIO = 8  # a shown picture is framed so that no side is more than this many times the other


class OverlayError(UserError, ValueError):
    """A colormap, opacity or map that cannot be rendered, said in one sentence."""


class CropGeometry(Protocol):
    """What overlay needs of ``core.models.Preprocessing``: where the model's input sits in the original."""

    image_size: int

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]: ...


def _coolwarm() -> np.ndarray:
    """A 256-entry BGR lookup table: blue (-1) through white (0) to red (+1)."""
    anchors = np.array([[59, 76, 192], [221, 221, 221], [180, 4, 38]], dtype=np.float64)  # RGB
    t = np.linspace(0, 2, 256)
    low = np.clip(np.floor(t).astype(int), 0, 1)
    rgb = anchors[low] + (anchors[low + 1] - anchors[low]) * (t - low)[:, None]
    return np.round(rgb[:, ::-1]).astype(np.uint8).reshape(256, 1, 3)


COLORMAPS: dict[str, int | np.ndarray] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "cividis": cv2.COLORMAP_CIVIDIS,
    "hot": cv2.COLORMAP_HOT,
    "parula": cv2.COLORMAP_PARULA,
    "rainbow": cv2.COLORMAP_RAINBOW,
    "bone": cv2.COLORMAP_BONE,
    "coolwarm": _coolwarm(),
}


def colorize(values: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """RGB uint8 colours [..., 3] of values in [0, 1] under a colormap of ``COLORMAPS``."""
    if colormap not in COLORMAPS:
        raise OverlayError(f"Unknown colormap '{colormap}'; choose one of {', '.join(COLORMAPS)}.")
    levels = np.round(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
    flat = levels.reshape(-1, 1)
    bgr = cv2.applyColorMap(flat, COLORMAPS[colormap])
    return bgr[..., ::-1].reshape(*values.shape, 3)


def cam_on_original(
    cam: np.ndarray, size: tuple[int, int], preprocessing: CropGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """The map [S, S] placed into the crop's region of an original of ``size`` (width, height).

    Returns (values [H, W] float32, inside [H, W] bool): bilinear resampling with pixel centres aligned
    (crop pixel i covers [x0 + i*s, x0 + (i+1)*s) in the original, s = crop side / S); ``inside`` marks
    the original's pixels whose centres fall in the crop.
    """
    width, height = size
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or min(cam.shape) < 1:
        raise OverlayError(f"A map must be one 2-D array, not an array of shape {tuple(cam.shape)}.")
    x0, y0, x1, y1 = preprocessing.crop_box(width, height)
    sx, sy = (x1 - x0) / cam.shape[1], (y1 - y0) / cam.shape[0]
    matrix = np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]], dtype=np.float64)
    values = cv2.warpAffine(cam, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    cols = (np.arange(width) + 0.5 >= x0) & (np.arange(width) + 0.5 < x1)
    rows = (np.arange(height) + 0.5 >= y0) & (np.arange(height) + 0.5 < y1)
    return values, rows[:, None] & cols[None, :]


def _to_unit(values: np.ndarray, signed: bool, scale: float | None) -> tuple[np.ndarray, float]:
    """Values in [0, 1] for the colormap; signed maps go through a symmetric scale [-s, s] -> [0, 1]."""
    if not signed:
        return np.clip(values, 0, 1), 1.0
    s = float(scale) if scale else float(np.abs(values).max())
    s = s if s > 0 else 1.0
    return np.clip(values / s, -1, 1) * 0.5 + 0.5, s


def overlay(
    image: Image.Image,
    cam: np.ndarray,
    preprocessing: CropGeometry,
    *,
    colormap: str = "jet",
    opacity: float = 0.5,
    signed: bool = False,
    scale: float | None = None,
    legend: bool = True,
    label: str = "importance",
) -> bytes:
    """PNG bytes of ``cam`` (computed on the model's input) blended over the original ``image``.

    ``cam`` is in [0, 1] (Grad-CAM, Grad-CAM++, LayerCAM, counterfactual) or, with ``signed=True``, a raw
    signed map shown on the symmetric scale [-scale, scale] (default: its largest magnitude). ``opacity`` is
    the map's weight in [0, 1]. With ``legend`` a colour bar saying what the colours mean is drawn below. A
    picture of extreme shape is framed on white first (``framed``: 2048x1 becomes 2048x256), so it and its colour
    bar can be seen.
    """
    if not 0 <= opacity <= 1:
        raise OverlayError(f"Opacity must be between 0 and 1, not {opacity}.")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    values, inside = cam_on_original(cam, image.size, preprocessing)
    unit, s = _to_unit(values, signed, scale)
    colours = colorize(unit, colormap).astype(np.float32)
    weight = (opacity * inside)[..., None]
    blended = np.round(rgb * (1 - weight) + colours * weight).astype(np.uint8)
    blended = framed(blended)  # a picture 2 px wide gets a colour bar wide enough to read
    if legend:
        bar = colour_bar(blended.shape[1], colormap, signed=signed, scale=s, label=label)
        blended = np.vstack([blended, bar])
    return encode_png(blended)


def framed(rgb: np.ndarray, max_ratio: float = MAX_SHOWN_RATIO) -> np.ndarray:
    """``rgb`` [h, w, 3] centred on white, so that no side is more than ``max_ratio`` times the other: a picture
    1 px high stays visible. The pixels themselves are untouched."""
    h, w = rgb.shape[:2]
    width = max(w, math.ceil(h / max_ratio))
    height = max(h, math.ceil(width / max_ratio))
    if (height, width) == (h, w):
        return rgb
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top : top + h, left : left + w] = rgb
    return canvas


def encode_png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OverlayError("The overlay could not be encoded as PNG.")
    return data.tobytes()


def _ticks(signed: bool, scale: float) -> list[tuple[float, str]]:
    if signed:
        return [(0.0, f"-{scale:.3g} against"), (0.5, "0"), (1.0, f"+{scale:.3g} for")]
    return [(0.0, "0 low"), (0.5, "0.5"), (1.0, "1 high")]


def colour_bar(
    width: int, colormap: str = "jet", *, signed: bool = False, scale: float = 1.0, label: str = "importance"
) -> np.ndarray:
    """An RGB strip [h, width, 3]: the colour gradient with its scale (0 low .. 1 high, or -s .. 0 .. +s)."""
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    font_scale = float(np.clip(width / 900, 0.35, 1.2))
    text_h = cv2.getTextSize("0", font, font_scale, thickness)[0][1]
    margin = max(6, width // 40)
    bar_h = max(8, text_h + 4)
    height = margin + bar_h + 2 * text_h + 12 + margin
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    span = max(1, width - 2 * margin)
    canvas[margin : margin + bar_h, margin : margin + span] = colorize(np.linspace(0, 1, span), colormap)[None]
    baseline = margin + bar_h + text_h + 6
    for position, text in _ticks(signed, scale):
        (w, _), _ = cv2.getTextSize(text, font, font_scale, thickness)
        x = int(np.clip(margin + position * span - w * position, 0, max(0, width - w)))
        cv2.putText(canvas, text, (x, baseline), font, font_scale, (40, 40, 40), thickness, cv2.LINE_AA)
    title = f"{label}: {'below 0 against the class, above 0 for it' if signed else '0 = low, 1 = high'}"
    (w, _), _ = cv2.getTextSize(title, font, font_scale, thickness)
    if w <= width:  # the title when there is room for it
        origin = ((width - w) // 2, baseline + text_h + 6)
        cv2.putText(canvas, title, origin, font, font_scale, (90, 90, 90), thickness, cv2.LINE_AA)
    return canvas


def colour_bar_png(width: int = 400, colormap: str = "jet", *, signed: bool = False, scale: float = 1.0) -> bytes:
    """The colour bar alone, as PNG bytes (for a legend beside several overlays)."""
    return encode_png(colour_bar(width, colormap, signed=signed, scale=scale))
