"""Overlays land on the original image where the model looked: crop mapped back, aspect kept, PNG out."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from core.models import Preprocessing
from core.overlay import COLORMAPS, OverlayError, cam_on_original, colorize, colour_bar_png, overlay

PRE = Preprocessing.for_size(64)  # resize the short side to 73, centre-crop 64


def _original(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hot_spot(row: int, col: int, size: int = 64) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[row, col] = 1.0
    return cam


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _expected_centre(box: tuple[float, float, float, float], row: int, col: int, size: int = 64) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return x0 + (col + 0.5) * (x1 - x0) / size, y0 + (row + 0.5) * (y1 - y0) / size


@pytest.mark.parametrize(("width", "height"), [(300, 200), (150, 400), (64, 64)])
@pytest.mark.parametrize(("row", "col"), [(10, 50), (60, 3), (32, 32)])
def test_hot_spot_lands_in_the_crop_region_of_the_original(width, height, row, col):
    values, inside = cam_on_original(_hot_spot(row, col), (width, height), PRE)
    assert values.shape == (height, width) == inside.shape
    y, x = np.unravel_index(np.argmax(values), values.shape)
    ex, ey = _expected_centre(PRE.crop_box(width, height), row, col)
    scale = (PRE.crop_box(width, height)[2] - PRE.crop_box(width, height)[0]) / 64  # original px per map px
    assert abs((x + 0.5) - ex) <= max(0.5, scale / 2) + 1e-6
    assert abs((y + 0.5) - ey) <= max(0.5, scale / 2) + 1e-6


def test_crop_region_of_a_landscape_original_is_centred_not_stretched():
    values, inside = cam_on_original(np.ones((64, 64), np.float32), (300, 200), PRE)
    # short side 200 -> 73: the crop is 64 * 200 / 73 = 175.3 px wide, centred: columns 62.3 .. 237.7
    cols = np.flatnonzero(inside.any(axis=0))
    assert (cols[0], cols[-1]) == (62, 237)
    rows = np.flatnonzero(inside.any(axis=1))
    assert (rows[0], rows[-1]) == (12, 187)
    assert inside[12:188, 62:238].all() and inside.sum() == 176 * 176


def test_overlay_png_keeps_original_resolution_and_leaves_outside_untouched():
    image = _original(300, 200)
    cam = np.zeros((64, 64), np.float32)
    cam[9:12, 49:52] = 1.0  # a 3x3 hot block: its centre stays exactly 1 after bilinear resampling
    png = overlay(image, cam, PRE, colormap="jet", opacity=1.0, legend=False)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = _decode(png)
    assert out.shape == (200, 300, 3)
    original = np.asarray(image)
    assert np.array_equal(out[:, :60], original[:, :60]) and np.array_equal(out[:, 240:], original[:, 240:])
    hot = colorize(np.array([1.0]), "jet")[0]
    cold = colorize(np.array([0.0]), "jet")[0]
    ex, ey = _expected_centre(PRE.crop_box(300, 200), 10, 50)
    assert np.array_equal(out[int(ey), int(ex)], hot)
    assert np.array_equal(out[150, 100], cold)  # inside the crop, far from the hot spot


def test_opacity_blends_linearly():
    image = _original(120, 90)
    cam = np.full((64, 64), 1.0, np.float32)
    none = _decode(overlay(image, cam, PRE, opacity=0.0, legend=False))
    half = _decode(overlay(image, cam, PRE, colormap="viridis", opacity=0.5, legend=False)).astype(int)
    assert np.array_equal(none, np.asarray(image))
    top = colorize(np.array([1.0]), "viridis")[0].astype(int)
    expected = (np.asarray(image)[45, 60].astype(int) + top) / 2
    assert np.abs(half[45, 60] - expected).max() <= 1


def test_legend_is_added_below_with_the_colormap_gradient():
    image = _original(300, 200)
    out = _decode(overlay(image, _hot_spot(5, 5), PRE, colormap="inferno", opacity=0.5))
    assert out.shape[1] == 300 and out.shape[0] > 200
    bar = out[200:]
    row = bar[np.argmax([(np.abs(r.astype(int) - 255).sum()) for r in bar])]  # the most colourful row
    low, high = colorize(np.array([0.0, 1.0]), "inferno")
    assert np.abs(row.astype(int) - low).sum(axis=1).min() <= 6
    assert np.abs(row.astype(int) - high).sum(axis=1).min() <= 6
    assert _decode(colour_bar_png(200, "jet", signed=True, scale=2.0)).shape[1] == 200


@pytest.mark.parametrize("width, height, shape", [(2048, 1, (256, 2048)), (2, 900, (900, 113)), (300, 200, None)])
def test_pictures_of_extreme_shape_are_framed_not_squashed(width, height, shape):
    image = _original(width, height)
    out = _decode(overlay(image, _hot_spot(5, 5), PRE, legend=False))
    expected = shape or (height, width)
    assert out.shape[:2] == expected
    top, left = (expected[0] - height) // 2, (expected[1] - width) // 2
    plain = _decode(overlay(image, _hot_spot(5, 5), PRE, legend=False, opacity=0.0))
    assert np.array_equal(plain[top : top + height, left : left + width], np.asarray(image))  # pixels untouched
    for margin in (plain[:top], plain[top + height :], plain[:, :left], plain[:, left + width :]):
        assert (margin == 255).all()  # framed on white, on every side it grew
    with_bar = _decode(overlay(image, _hot_spot(5, 5), PRE))
    assert with_bar.shape[1] == expected[1] and with_bar.shape[0] > expected[0]  # the bar as wide as the frame


def test_signed_maps_use_a_symmetric_scale():
    cam = np.zeros((64, 64), np.float32)
    cam[:32] = -2.0
    cam[32:] = 1.0
    image = _original(64, 64)
    pre = Preprocessing(image_size=64, resize=64)
    out = _decode(overlay(image, cam, pre, colormap="coolwarm", opacity=1.0, signed=True, legend=False))
    blue, red = colorize(np.array([0.0, 0.75]), "coolwarm")  # -2 is the scale's end, +1 half way up
    assert np.array_equal(out[5, 5], blue) and np.array_equal(out[60, 5], red)


def test_every_offered_colormap_renders():
    ramp = np.linspace(0, 1, 256)
    for name in COLORMAPS:
        colours = colorize(ramp, name)
        assert colours.shape == (256, 3) and colours.dtype == np.uint8
        assert not np.array_equal(colours[0], colours[-1]), name


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"colormap": "nope"}, "Unknown colormap"), ({"opacity": 1.5}, "Opacity")]
)
def test_bad_options_are_clear_user_errors(kwargs, message):
    with pytest.raises(OverlayError, match=message) as info:
        overlay(_original(10, 10), np.zeros((64, 64)), PRE, **kwargs)
    assert isinstance(info.value, UserError)


def test_a_map_that_is_not_2d_is_refused():
    with pytest.raises(OverlayError, match="2-D"):
        overlay(_original(10, 10), np.zeros((1, 64, 64)), PRE)
