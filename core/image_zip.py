"""Unpack a user's ``.zip`` of class folders safely into a folder of its own, ready as an ``imagefolder`` root.

``unpack_image_zip(source, name)`` writes under ``<data root>/uploads/<safe name>/`` (or ``-2``, ``-3`` ... when
taken) and returns an ``Unpacked``. It refuses the whole archive, with one sentence, when a member would leave
that folder (an absolute path, ``..``, a drive letter), is a symbolic link or encrypted, or when the archive
looks like a zip bomb: too many members, a member or a total over ``ZipLimits`` (the sizes the archive declares
are checked first, and the bytes really written are counted while extracting), or a member that expands more
than ``max_ratio`` times. Only image files (``core.images.is_image_name`` whose header Pillow reads) are kept;
the others are skipped and listed by name. A refused archive leaves nothing behind: members are extracted into
a hidden temporary folder that is renamed into place only once the result is a valid image folder. The same
archive dropped again (the same SHA-256) gets the folder it was unpacked into before, while that folder still holds
exactly the images unpacked into it, by name and size (one changed since gets a fresh copy beside it, and is left as
it is; hidden files and what file managers leave there do not count).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Union

from core import paths
from core.datasets import SPLITS, skipped_folder
from core.errors import UserError
from core.images import MAX_FILE_BYTES, ImageError, check_image, is_image_name
from core.sizes import iec_bytes

ZipSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]
CHUNK = 1 << 20
_SYMLINK = 0o120000
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ArchiveError(UserError, ValueError):
    """An archive that is refused, in one sentence naming the archive and the reason."""


@dataclass(frozen=True)
class ZipLimits:
    """What an uploaded archive may hold (uncompressed sizes)."""

    max_members: int = 50_000
    max_total_bytes: int = 4 << 30
    max_file_bytes: int = MAX_FILE_BYTES
    max_ratio: float = 100.0  # uncompressed / compressed size of one member, and of all the images together ...
    ratio_floor_bytes: int = 1 << 20  # ... checked for a member above this size (tiny files compress well) ...
    archive_ratio_floor_bytes: int = 256 << 20  # ... and for the archive above this (BMPs of plain shapes pack 100x+)


@dataclass(frozen=True)
class Unpacked:
    """Where the images went: ``folder`` is the imagefolder root (inside ``target``, the folder created)."""

    folder: Path
    target: Path
    images: int
    skipped: list[str] = field(default_factory=list)  # "name (why)" of every member not kept


def upload_name(filename: str) -> str:
    """A safe folder name from an uploaded file's name: ``"My Pets (2).zip"`` -> ``"My-Pets-2"``."""
    stem = PurePosixPath(filename.replace("\\", "/")).name
    stem = stem[:-4] if stem.lower().endswith(".zip") else stem
    cleaned = _UNSAFE_CHARS.sub("-", stem).strip("-._")[:60]
    return cleaned or "upload"


def unpack_image_zip(source: ZipSource, name: str, parent: str | os.PathLike[str] | None = None,
                     limits: ZipLimits = ZipLimits()) -> Unpacked:
    """Check, extract and validate an archive of class folders (see the module docstring); ``name`` is the
    uploaded file's name, used in messages and for the folder."""
    parent = Path(parent) if parent is not None else paths.uploads_dir()
    digest = _sha256(source, name)
    earlier = _unpacked_before(parent, digest)
    if earlier is not None:
        return earlier
    made_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=parent))
    try:
        with _open_zip(source, name) as archive:
            members, skipped = _plan(archive, name, limits)
            _check_room(members, parent, name)
            unreadable = _extract(archive, members, work, name, limits)
        inner = _dataset_folder(work)
        _check_image_folder(inner, work, name)
        (work / MARKER).write_text(json.dumps({"sha256": digest, "folder": inner.relative_to(work).as_posix(),
                                               "images": len(members) - len(unreadable),
                                               "skipped": skipped + unreadable, "files": _image_files(work)}))
        target = _claim(work, parent, upload_name(name))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if made_parent:
            _remove_if_empty(parent)
        raise
    return _unpacked(target)


MARKER = ".reslens-upload.json"  # in each unpacked folder: the archive's SHA-256 and what was kept (hidden)


def _unpacked(target: Path, about: dict | None = None) -> Unpacked:
    about = about if about is not None else json.loads((target / MARKER).read_text())
    return Unpacked(paths.resolve_inside(target, about["folder"]), target, about["images"], about["skipped"])


def _unpacked_before(parent: Path, digest: str) -> Unpacked | None:
    """The folder the same archive was unpacked into before (a zip dropped again), when it still holds the images
    unpacked into it and no others: one whose images were since deleted, added to or replaced is not reused."""
    for marker in sorted(parent.glob(f"*/{MARKER}")):
        try:
            about = json.loads(marker.read_text())
            if about["sha256"] == digest and (found := _unpacked(marker.parent, about)).folder.is_dir() \
                    and about.get("files") == _image_files(found.target):
                return found
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a marker someone edited: that folder is not reused
    return None


def _image_files(target: Path) -> dict[str, int]:
    """The images an unpacked folder holds (relative path: size), hidden ones left out."""
    found = {}
    for path in target.rglob("*"):
        relative = path.relative_to(target).as_posix()
        if is_image_name(path.name) and not _hidden(relative) and path.is_file():
            found[relative] = path.stat().st_size
    return found


def _sha256(source: ZipSource, name: str) -> str:
    if isinstance(source, (bytes, bytearray)):
        return hashlib.sha256(source).hexdigest()
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        digest = hashlib.file_digest(source, "sha256").hexdigest()
        source.seek(0)
        return digest
    except OSError as exc:
        raise ArchiveError(f"{name} is not a readable .zip archive ({exc.strerror or exc}).") from None


def _check_room(members: list[Member], parent: Path, name: str) -> None:
    """Refuse an archive whose images would not fit on the disk, before anything is written."""
    needed, free = sum(info.file_size for info, _ in members), shutil.disk_usage(parent).free
    if needed > free:
        raise ArchiveError(f"{name} needs {iec_bytes(needed)} for its images, but only {iec_bytes(free)} is free "
                           f"in {parent}.")


def describe_skipped(skipped: list[str], shown: int = 8) -> str:
    """One sentence naming the members that were not kept: ``"Skipped 2 files: a.txt (not an image), ..."``."""
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"Skipped {len(skipped)} file{'s' * (len(skipped) != 1)}: {', '.join(skipped[:shown])}{more}."


def _open_zip(source: ZipSource, name: str) -> zipfile.ZipFile:
    data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        archive = zipfile.ZipFile(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{name} is not a readable .zip archive ({exc}).") from None
    for info in archive.infolist():  # once, for paths and messages alike (reading checks orig_filename)
        info.filename = _utf8_name(info)
    return archive


Member = tuple[zipfile.ZipInfo, str]  # a member to extract and its path inside the target folder


def _plan(archive: zipfile.ZipFile, name: str, limits: ZipLimits) -> tuple[list[Member], list[str]]:
    """The members to extract and the skipped names, from what the archive declares."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(f"{name} holds {len(infos)} entries; at most {limits.max_members} are accepted.")
    members: list[Member] = []
    skipped: list[str] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        relative = _member_path(info, name)
        if info.is_dir() or not relative:
            continue
        if _hidden(relative):
            skipped.append(f"{info.filename} (hidden)")
            continue
        if not is_image_name(relative):
            skipped.append(f"{info.filename} (not an image)")
            continue
        _check_declared(info, name, limits)
        if relative in seen:
            raise ArchiveError(f"{name} lists {info.filename} more than once.")
        seen.add(relative)
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ArchiveError(f"{name} would unpack to more than {iec_bytes(limits.max_total_bytes)} of images; "
                               "split it, or point at a folder instead.")
        members.append((info, relative))
    if not members:
        raise ArchiveError(f"{name} holds no image files (JPEG, PNG, WebP, BMP, GIF or TIFF in class folders).")
    packed = sum(info.compress_size for info, _ in members)
    if total > limits.archive_ratio_floor_bytes and total > limits.max_ratio * max(packed, 1):
        raise ArchiveError(f"{name} holds images that expand {total / max(packed, 1):.0f} times as a whole (more than "
                           f"{limits.max_ratio:.0f}); it looks like a zip bomb and is refused.")
    return members, skipped


def _member_path(info: zipfile.ZipInfo, name: str) -> str:
    """The member's path inside the target folder, or an ``ArchiveError`` when it could lead outside it."""
    raw = info.filename
    text = raw.replace("\\", "/")
    if "\0" in text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ArchiveError(f"{name} holds {raw!r}, an absolute path; archives that write outside their folder "
                           "are refused.")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{name} holds {raw!r}, which climbs out with '..'; archives that write outside "
                           "their folder are refused.")
    if (info.external_attr >> 16) & 0o170000 == _SYMLINK:
        raise ArchiveError(f"{name} holds {raw!r}, a symbolic link; archives with links are refused.")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{name} holds {raw!r}, which is encrypted; ResLens cannot read encrypted archives.")
    return "/".join(parts)


def _utf8_name(info: zipfile.ZipInfo) -> str:
    """The member's name: zipfile reads names without the UTF-8 flag as cp437, but many zip tools write UTF-8
    without setting it; such a name is read as UTF-8 when its bytes are valid UTF-8."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length] + "..."


def _hidden(relative: str) -> bool:
    """A hidden file or one in a hidden folder or macOS's ``__MACOSX`` resource forks."""
    return any(skipped_folder(p) for p in relative.split("/"))


def _check_declared(info: zipfile.ZipInfo, name: str, limits: ZipLimits) -> None:
    if info.file_size > limits.max_file_bytes:
        raise ArchiveError(f"{name} holds {info.filename}, {iec_bytes(info.file_size)} unpacked; "
                           f"files over {iec_bytes(limits.max_file_bytes)} are refused.")
    if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        raise ArchiveError(f"{name} holds {info.filename}, which expands {ratio:.0f} times (more than "
                           f"{limits.max_ratio:.0f}); it looks like a zip bomb and is refused.")


def _extract(archive: zipfile.ZipFile, members: list[Member], work: Path, name: str,
             limits: ZipLimits) -> list[str]:
    """Write every planned member under ``work``, counting real bytes; returns the unreadable ones (removed)."""
    total, unreadable = 0, []
    for info, relative in members:
        target = paths.resolve_inside(work, relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            total += _copy_member(archive, info, target, name, min(info.file_size, limits.max_file_bytes),
                                  limits.max_total_bytes - total)
        except OSError as exc:
            raise ArchiveError(_write_problem(exc, info, target, work, name)) from None
        try:
            check_image(target, name=info.filename)
        except ImageError as exc:
            target.unlink()
            unreadable.append(f"{info.filename} ({_reason(exc, info.filename)})")
    return unreadable


def _reason(exc: ImageError, filename: str) -> str:
    """Why an image was skipped, short and without its name: ``"x.png is damaged or truncated and cannot be
    decoded (...)."`` -> ``"damaged or truncated and cannot be decoded"``."""
    text = str(exc).removeprefix(filename).split(" (")[0].strip().rstrip(".;")
    return text.removeprefix("is ") or "not a readable image"


def _write_problem(exc: OSError, info: zipfile.ZipInfo, target: Path, work: Path, name: str) -> str:
    """The sentence for an archive member that could not be written."""
    if exc.errno == errno.ENOSPC:  # the disk filled up meanwhile (_check_room found room before)
        return f"The disk filled up while {name} was unpacked into {work.parent}; free some space and try again."
    if exc.errno == errno.ENAMETOOLONG:
        return f"{name} holds a name too long for this disk's file system: {_cut(info.filename, 80)}"
    clash = next((p for p in target.parents if p.is_file()), target if target.is_dir() else None)
    if clash is not None:
        return f"{name} holds {clash.relative_to(work).as_posix()} both as a file and as a folder."
    if isinstance(exc, FileExistsError):  # two names one file on a case-insensitive disk
        return f"{name} lists {info.filename} more than once."
    return f"{name} could not be unpacked at {info.filename} ({exc.strerror or exc})."


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str, allowed: int,
                 left: int) -> int:
    """Stream one member to ``target``; refuse it as soon as it writes more than it declared or than is left."""
    written = 0
    try:
        with archive.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > allowed or written > left:
                    raise ArchiveError(f"{name} holds {info.filename}, which unpacks to more bytes than it "
                                       "declares or than the size limit; it is refused.")
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ArchiveError(f"{name} is damaged or uses an unsupported compression ({info.filename}: {exc}).") \
            from None
    return written


def _visible_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not skipped_folder(p.name)]


def _dataset_folder(work: Path) -> Path:
    """The folder holding the class folders: wrapper folders (``pets/`` around ``pets/cat``...) are stepped into,
    but not a lone ``train/`` or ``val/`` (a split without its other half is refused, as for a typed folder)."""
    folder = work
    while True:
        dirs = _visible_dirs(folder)
        loose = any(p.is_file() for p in folder.iterdir())
        if loose or len(dirs) != 1 or dirs[0].name.lower() in SPLITS or not _visible_dirs(dirs[0]):
            return folder
        folder = dirs[0]


def _check_image_folder(folder: Path, work: Path, name: str) -> None:
    """Refuse an archive whose images do not form an image folder (the sentence names paths in the archive)."""
    from core.datasets import DatasetError, class_counts

    try:
        for split in SPLITS:  # val/ too: a class of val/ that train/ lacks refuses the folder
            class_counts("imagefolder", folder, split)
    except DatasetError as exc:
        text = str(exc).replace(str(work), name)
        raise ArchiveError(text if text.startswith(f"{name} ") else f"{name} cannot be used: {text}") from None


def _claim(work: Path, parent: Path, stem: str) -> Path:
    """Rename ``work`` to ``parent/stem`` (or ``stem-2``, ``stem-3``... when taken); returns the new path."""
    n = 1
    while True:
        target = parent / (stem if n == 1 else f"{stem}-{n}")
        if not target.exists():
            try:
                os.rename(work, target)
                return target
            except OSError:
                pass  # taken between the check and the rename: try the next name
        n += 1


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
