"""core.images.load_image: every awkward file gives an upright RGB image or one clear ImageError."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import images
from core.errors import UserError
from core.images import ImageError, load_image, read_header


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_image_error_is_a_user_error_and_a_value_error():
    assert issubclass(ImageError, UserError) and issubclass(ImageError, ValueError)


def test_empty_file_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png is empty"):
        load_image(path)


def test_text_file_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 10)
    with pytest.raises(ImageError, match=r"notes\.jpg is not a readable image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()} is damaged or truncated"):
        load_image(path)


def test_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(20_000, 20_000))  # 400 megapixels declared in 100 bytes
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(ImageError, match=r"bomb\.png declares .*too many pixels|bomb\.png declares 20000x20000"):
        load_image(path)
    assert decoded == []


def test_png_just_over_max_pixels_is_refused_by_our_own_limit(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageError, match=r"declares 200x100 pixels, more than"):
        load_image(_bomb_png(200, 100), name="wide.png")


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 64, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60


def test_rgba_transparent_areas_sit_on_neutral_grey(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((3, 1), (0, 0, 255, 0))
    image = load_image(_save(rgba, tmp_path / "alpha.png"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 1)) == (128, 128, 128)


def test_palette_image_without_transparency(tmp_path):
    image = load_image(_save(Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), tmp_path / "pal.png"))
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (10, 200, 30)


def test_palette_image_with_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    image = load_image(_save(pal, tmp_path / "pal.png", transparency=0))
    assert image.getpixel((0, 0)) == (128, 128, 128)
    assert image.getpixel((3, 3)) == (255, 0, 0)


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(stored, tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # stored left (red) is shown on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_one_pixel_image(tmp_path):
    image = load_image(_save(Image.new("L", (1, 1), 77), tmp_path / "dot.bmp"))
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (77, 77, 77)


def test_very_large_photo_is_downscaled_with_jpeg_draft(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (8000, 6000), (20, 120, 220)), tmp_path / "big.jpg", quality=70)
    drafts = []
    real_draft = Image.Image.draft

    def spy(self, mode, size):
        drafts.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(Image.Image, "draft", spy)
    image = load_image(path)
    assert image.size == (images.MAX_SIDE, images.MAX_SIDE * 3 // 4)
    assert drafts, "the JPEG decoder should have been asked to scale down while decoding"
    assert max(abs(a - b) for a, b in zip(image.getpixel((100, 100)), (20, 120, 220))) < 8


def test_large_png_is_downscaled_too(tmp_path):
    image = load_image(_save(Image.new("RGB", (3000, 1000), (1, 2, 3)), tmp_path / "wide.png"))
    assert image.size == (images.MAX_SIDE, round(1000 * images.MAX_SIDE / 3000))


def test_tiff_is_read(tmp_path):
    image = load_image(_save(Image.new("RGB", (6, 3), (9, 8, 7)), tmp_path / "scan.tif"))
    assert image.size == (6, 3) and image.getpixel((5, 2)) == (9, 8, 7)


def test_webp_is_read_from_bytes():
    data = io.BytesIO()
    Image.new("RGB", (5, 5), (200, 0, 0)).save(data, "WEBP", lossless=True)
    assert load_image(data.getvalue(), name="x.webp").getpixel((2, 2)) == (200, 0, 0)


def test_svg_is_refused_by_name(tmp_path):
    path = tmp_path / "logo.svg"
    path.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    expected = r"logo\.svg is an SVG image; ResLens reads JPEG, PNG, WebP, BMP, GIF and TIFF\.$"
    with pytest.raises(ImageError, match=expected):
        load_image(path)


def test_svg_content_under_another_name_is_refused_by_name():
    with pytest.raises(ImageError, match=r"upload\.png is an SVG image"):
        load_image(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', name="upload.png")


@pytest.mark.parametrize(("brand", "kind"), [(b"heic", "a HEIC"), (b"avif", "an AVIF"), (b"mif1", "a HEIF")])
def test_heif_family_is_refused_by_name(brand, kind):
    data = struct.pack(">I", 24) + b"ftyp" + brand + b"\x00\x00\x00\x00" + b"mif1" + brand + b"\x00" * 64
    with pytest.raises(ImageError, match=rf"IMG_1\.bin is {kind} image; ResLens reads"):
        load_image(io.BytesIO(data), name="IMG_1.bin")


def test_file_larger_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    path = _save(Image.new("RGB", (64, 64)), tmp_path / "heavy.bmp")
    with pytest.raises(ImageError, match=r"heavy\.bmp is 12\.1 KiB; images larger than 1000 bytes are refused"):
        load_image(path)
    with pytest.raises(ImageError, match="images larger than"):
        load_image(io.BytesIO(path.read_bytes()), name="heavy.bmp")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=r"Cannot read .*nothing\.jpg"):
        load_image(tmp_path / "nothing.jpg")


def test_uploaded_file_object_uses_its_name():
    upload = io.BytesIO(b"GIF89a broken")
    upload.name = "cat.gif"
    with pytest.raises(ImageError, match=r"^cat\.gif "):
        load_image(upload)


def test_read_header_does_not_decode(tmp_path, monkeypatch):
    path = _save(Image.new("L", (30, 20)), tmp_path / "grey.jpg")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    header = read_header(path)
    assert (header.format, header.mode, header.width, header.height) == ("JPEG", "L", 30, 20)


def test_supported_extensions_and_limits_are_exported():
    assert set(images.SUPPORTED_EXTENSIONS) == {"jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff"}
    assert images.MAX_FILE_BYTES == images.MAX_UPLOAD_MB * 1024 * 1024
