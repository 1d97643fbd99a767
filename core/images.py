"""The one image decoder every path uses (uploads, CLI, data sets): bytes or a file in, RGB out.

``load_image`` returns an upright RGB ``PIL.Image.Image`` (EXIF orientation applied, transparency
composited on neutral grey, the first frame of an animation, 16-bit data scaled to 8 bits, photos
larger than ``MAX_SIDE`` downscaled) or raises ``ImageError`` with one sentence naming the file and
the problem. Pillow does the decoding; only the formats in ``PILLOW_FORMATS`` are ever parsed, and
sizes are checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UserError
from core.sizes import iec_bytes

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

MAX_UPLOAD_MB = 50
MAX_FILE_BYTES = MAX_UPLOAD_MB * 1024 * 1024  # Streamlit's server.maxUploadSize is set to MAX_UPLOAD_MB
MAX_PIXELS = 100_000_000  # width * height declared in the header; more is refused before decoding
MAX_SIDE = 2048  # longer side of a returned image; larger photos are downscaled
BACKGROUND = (128, 128, 128)  # neutral grey under transparent areas
SUPPORTED_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff")
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")  # "JPEG" also opens MPO (phones)
_READABLE = "ResLens reads JPEG, PNG, WebP, BMP, GIF and TIFF"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)

_REFUSED_EXTENSIONS = {".svg": "an SVG", ".svgz": "an SVG", ".heic": "a HEIC", ".heif": "a HEIF",
                       ".avif": "an AVIF"}
_HEIF_BRANDS = {b"heic": "a HEIC", b"heix": "a HEIC", b"hevc": "a HEIC", b"hevx": "a HEIC",
                b"heim": "a HEIC", b"heis": "a HEIC", b"mif1": "a HEIF", b"msf1": "a HEIF",
                b"avif": "an AVIF", b"avis": "an AVIF"}


class ImageError(UserError, ValueError):
    """An image that cannot be used, with one sentence naming the file and the problem."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding pixels."""

    format: str
    mode: str
    width: int
    height: int


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path, bytes or a binary file) into an upright RGB image, or raise ``ImageError``."""
    label = _label(source, name)
    fp = _open_source(source, label)
    with _open_pillow(fp, label) as image:
        _check_pixels(image, label)
        _draft(image)
        _decode(image, label)
        return _finish(image, label)


def is_image_name(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has one of ``SUPPORTED_EXTENSIONS`` (any case) and is not hidden (``.name``)."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and base.rpartition(".")[2].lower() in SUPPORTED_EXTENSIONS and "." in base


def read_header(source: ImageSource, name: str | None = None) -> ImageHeader:
    """Format, mode and size of an image from its header only (no pixel is decoded)."""
    label = _label(source, name)
    with _open_pillow(_open_source(source, label), label) as image:
        return ImageHeader(image.format or "", image.mode, image.width, image.height)


def check_image(path: str | os.PathLike[str], name: str | None = None) -> ImageHeader:
    """The header of a file ``load_image`` decodes, else its ``ImageError``, read as cheaply as is safe: the header
    and its pixel count; the pixels too where the header cannot vouch for the rest of the file (a BMP or TIFF, or a
    JPEG, PNG or GIF without its end marker: cut short?). What the data report and the zip check use."""
    label = _label(path, name)
    with _open_pillow(_open_source(path, label), label) as image:
        _check_pixels(image, label)
        header = ImageHeader(image.format or "", image.mode, image.width, image.height)
    if not _ends_whole(path, header.format):
        load_image(path, name)
    return header


# a whole file's last bytes: JPEG's end-of-image, PNG's IEND chunk, GIF's block terminator and trailer
_ENDINGS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x00;"}
_READ_WHOLE = ("WEBP",)  # Pillow reads a WebP file whole when it opens it: a cut one fails there


def _ends_whole(path: str | os.PathLike[str], image_format: str) -> bool:
    """Whether a file is known to end where its format ends. Some writers add bytes after the end marker, so a
    False is only a reason to decode the file to be sure (as it is for formats without an end marker)."""
    if image_format in _READ_WHOLE:
        return True
    ending = _ENDINGS.get(image_format)
    if ending is None:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(-len(ending), os.SEEK_END)
            return fh.read() == ending
    except OSError:
        return False


def _label(source: ImageSource, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "") or "the uploaded image")


def _open_source(source: ImageSource, label: str) -> str | BinaryIO:
    """A path or an in-memory file, after refusing empty, oversized, SVG and HEIF/AVIF sources."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
                raise ImageError(f"{label} is not a regular file (a folder, pipe or device); give an image file.")
            size = info.st_size
            with path.open("rb") as fh:
                head = fh.read(64)
        except OSError as exc:
            raise ImageError(f"Cannot read {label}: {exc.strerror or exc}.") from exc
        _check_size(size, label)
        _refuse_unsupported(head, label)
        return os.fspath(path)
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else _read_stream(source)
    _check_size(len(data), label)
    _refuse_unsupported(data[:64], label)
    return io.BytesIO(data)


def _read_stream(stream: BinaryIO) -> bytes:
    if hasattr(stream, "seek"):
        try:
            stream.seek(0)
        except (OSError, ValueError):
            pass
    return stream.read(MAX_FILE_BYTES + 1)


def _check_size(size: int, label: str) -> None:
    if size == 0:
        raise ImageError(f"{label} is empty (0 bytes).")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{label} is {iec_bytes(size)}; images larger than {iec_bytes(MAX_FILE_BYTES)} are refused.")


def _refuse_unsupported(head: bytes, label: str) -> None:
    kind = _REFUSED_EXTENSIONS.get(Path(label).suffix.lower()) or _sniff_unsupported(head)
    if kind:
        raise ImageError(f"{label} is {kind} image; {_READABLE}.")


def _sniff_unsupported(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(head[8:12])
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head.lower()):
        return "an SVG"
    return None


def _open_pillow(fp: str | BinaryIO, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} declares too many pixels to decode safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not a readable image (not JPEG, PNG, WebP, BMP, GIF or TIFF data).") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label} has a damaged header: {exc}.") from exc


def _check_pixels(image: Image.Image, label: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{label} declares an empty size ({width}x{height}).")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{label} declares {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixels "
            "ResLens decodes (a possible decompression bomb)."
        )


def _draft(image: Image.Image) -> None:
    """Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding when the photo is large."""
    long_side = max(image.size)
    if image.format in ("JPEG", "MPO") and long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
        image.draft(image.mode, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def _decode(image: Image.Image, label: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} declares too many pixels to decode safely ({exc}).") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label} is damaged or truncated and cannot be decoded ({exc}).") from exc


def _finish(image: Image.Image, label: str) -> Image.Image:
    try:
        return oriented_rgb(image)
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label} uses colour mode {image.mode}, which cannot be converted to RGB ({exc}).") from exc


def oriented_rgb(image: Image.Image) -> Image.Image:
    """What every decoded image becomes: turned by its EXIF orientation, RGB (``to_rgb``), its longer side at most
    ``MAX_SIDE``. (An exported model's predict.py carries this function's source: it reads images the same way.)"""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - unreadable EXIF of any kind: keep the pixels as stored
        pass
    rgb = to_rgb(image)
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: high bit depths scaled to 8 bits, transparency composited on ``BACKGROUND``."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit / float) grey values into 0-255 instead of clipping them white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < values.max() <= 65535):
        values = values / 257.0
    elif values.max() > 255:
        values = values * (255.0 / values.max())
    elif image.mode == "F" and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
