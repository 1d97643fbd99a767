"""core.image_zip: an uploaded .zip of class folders unpacked under the data root, malicious ones refused
with one sentence and nothing left behind; then a training stage on what was unpacked."""
from __future__ import annotations

import io
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from core import paths
from core.datasets import class_counts
from core.errors import UserError
from core.image_zip import ArchiveError, ZipLimits, unpack_image_zip, upload_name
from tests.data_fixtures import IMAGEFOLDER_SIZES, make_imagefolder, write_image, zip_folder


def pets_zip(tmp_path: Path, prefix: str = "pets/", layout: str = "flat") -> bytes:
    """A zip of class folders (in a wrapper folder ``prefix``) with the fixture's non-image files, a macOS
    resource fork and a .jpg that is not an image."""
    folder = make_imagefolder(tmp_path / "src", layout)
    (folder / "cat" if layout == "flat" else folder / "train" / "cat").joinpath("fake.jpg").write_text("no image")
    archive = zip_folder(folder, tmp_path / "pets.zip", prefix)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/pets/cat/._cat_0.jpg", b"\0\5\26\7")
    return archive.read_bytes()


def image_bytes(tmp_path: Path, name: str = "x.PNG") -> bytes:
    return write_image(tmp_path / "one" / name, 7).read_bytes()


def nothing_left() -> bool:
    uploads = paths.uploads_dir()
    return not uploads.exists() or not any(uploads.iterdir())


def test_a_zip_of_class_folders_is_unpacked_under_the_data_root(tmp_path):
    data = pets_zip(tmp_path)
    found = unpack_image_zip(data, "My Pets (1).zip")
    assert found.target == paths.uploads_dir() / "My-Pets-1" and found.folder == found.target / "pets"
    assert class_counts("imagefolder", found.folder, "train") | class_counts("imagefolder", found.folder, "val")
    counts = {c: sum(class_counts("imagefolder", found.folder, s)[c] for s in ("train", "val"))
              for c in IMAGEFOLDER_SIZES}
    assert counts == IMAGEFOLDER_SIZES and found.images == sum(IMAGEFOLDER_SIZES.values())
    skipped = set(found.skipped)
    assert {"pets/cat/notes.txt (not an image)", "pets/cat/.DS_Store (hidden)", "pets/cat/.hidden_cat.jpg (hidden)",
            "__MACOSX/pets/cat/._cat_0.jpg (hidden)", "pets/cat/fake.jpg (not a readable image)"} <= skipped
    kept = sorted(p.relative_to(found.target).as_posix() for p in found.target.rglob("*") if p.is_file())
    kept.remove(".reslens-upload.json")  # the archive's checksum, so the same zip dropped again is reused
    assert all(not Path(k).name.startswith(".") and k.split(".")[-1].lower() != "txt" for k in kept)
    (found.folder / "dog" / "Thumbs.db").write_bytes(b"\0")  # what a file manager leaves changes nothing
    assert unpack_image_zip(data, "pets again.zip") == found  # the same archive again: its folder is reused
    removed = sorted((found.folder / "dog").glob("*.*g"))[0]
    shutil.copy(removed, removed.with_name("new.png"))
    removed.unlink()  # ... while it is as it was unpacked: a changed folder gets a fresh copy, and is kept
    fresh = unpack_image_zip(data, "pets again.zip")
    assert fresh.target == paths.uploads_dir() / "pets-again" and (fresh.folder / "dog" / removed.name).is_file()
    assert fresh.images == found.images and not removed.exists()
    shutil.rmtree(fresh.target)
    other = io.BytesIO(data)
    with zipfile.ZipFile(other, "a") as zf:
        zf.writestr("dog/extra.png", image_bytes(tmp_path))
    again = unpack_image_zip(other, "My Pets (1).zip")
    assert again.target == paths.uploads_dir() / "My-Pets-1-2"  # another archive never mixes with the first
    assert again.images == found.images + 1


def test_upload_names_are_safe_folder_names():
    assert upload_name("../../etc/passwd.zip") == "passwd"
    assert upload_name("C:\\Users\\me\\Holiday photos.ZIP") == "Holiday-photos"
    assert upload_name("...zip") == "upload"


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info, target.encode()


def _lying_size(data: bytes, member: str) -> bytes:
    """The archive with ``member``'s declared uncompressed size cut to 10 bytes (local and central headers)."""
    out = bytearray(data)
    name = member.encode()
    local = out.index(b"PK\x03\x04")
    while out[local + 30:local + 30 + len(name)] != name:
        local = out.index(b"PK\x03\x04", local + 4)
    struct.pack_into("<I", out, local + 22, 10)
    central = out.index(b"PK\x01\x02")
    while out[central + 46:central + 46 + len(name)] != name:
        central = out.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", out, central + 24, 10)
    return bytes(out)


MALICIOUS = {
    "path traversal": (lambda img: _zip([("cat/a.png", img), ("dog/b.png", img), ("../../escape.png", img)]),
                       ZipLimits(), "holds '../../escape.png', which climbs out with '..'"),
    "absolute path": (lambda img: _zip([("cat/a.png", img), ("/tmp/abs.png", img)]),
                      ZipLimits(), "holds '/tmp/abs.png', an absolute path"),
    "symlink": (lambda img: _zip([("cat/a.png", img), _symlink("dog/b.png", "/etc/passwd")]),
                ZipLimits(), "holds 'dog/b.png', a symbolic link"),
    "bomb by ratio": (lambda img: _zip([("cat/a.png", img), ("dog/big.bmp", b"\0" * (3 << 20))]),
                      ZipLimits(), r"dog/big.bmp, which expands \d+ times .*zip bomb"),
    "too many files": (lambda img: _zip([(f"cat/{i}.png", img) for i in range(6)]),
                       ZipLimits(max_members=5), "holds 6 entries; at most 5 are accepted"),
    "file too large": (lambda img: _zip([("cat/a.png", img), ("dog/b.png", img)]),
                       ZipLimits(max_file_bytes=1000), r"holds cat/a.png, 1.\d KiB unpacked; files over 1000 bytes "
                                                       "are refused"),
    "total too large": (lambda img: _zip([("cat/a.png", img), ("dog/b.png", img)]),
                        ZipLimits(max_total_bytes=2000), "would unpack to more than 2.0 KiB of images"),
    "declared size lies": (lambda img: _lying_size(_zip([("cat/a.png", img), ("dog/b.bmp", b"\1" * 5000)],
                                                        zipfile.ZIP_STORED), "dog/b.bmp"),
                           ZipLimits(), r"is damaged .*dog/b.bmp"),
    "only non-images": (lambda img: _zip([("cat/readme.txt", b"hi"), ("dog/run.sh", b"rm -rf /")]),
                        ZipLimits(), r"holds no image files \(JPEG, PNG"),
    "not class folders": (lambda img: _zip([("a.png", img), ("b.png", img)]), ZipLimits(),
                          "needs at least two class folders with images"),
    "not a zip": (lambda img: img, ZipLimits(), "is not a readable .zip archive"),
    "bomb of small files": (lambda img: _zip([("cat/a.png", img)] + [(f"dog/{i}.bmp", b"\0" * (900 << 10))
                                                                      for i in range(3)]),
                            ZipLimits(archive_ratio_floor_bytes=2 << 20), r"holds images that expand \d+ times as a whole \(more than 100\); it looks "
                                         "like a zip bomb"),
    "a file and a folder": (lambda img: _zip([("cat.png", img), ("cat.png/x.png", img), ("dog/b.png", img)]),
                            ZipLimits(), "holds cat.png both as a file and as a folder"),
    "a folder and a file": (lambda img: _zip([("cat/a.png/b.png", img), ("cat/a.png", img), ("dog/c.png", img)]),
                            ZipLimits(), "holds cat/a.png both as a file and as a folder"),
    "name too long": (lambda img: _zip([("L" * 300 + "/a.png", img), ("dog/b.png", img)]),
                      ZipLimits(), "holds a name too long for this disk's file system: LLLL"),
    "train/ without val/": (lambda img: _zip([("train/cat/a.png", img), ("train/dog/b.png", img)]), ZipLimits(),
                            "has a train/ folder of classes but no val/ folder"),  # as a typed folder is refused
    "a val/ class train/ lacks": (lambda img: _zip([(f"{split}/{c}/a.png", img) for split in ("train", "val")
                                                    for c in ("cat", "dog")] + [("val/emu/a.png", img)]),
                                  ZipLimits(), r"val/emu is not a class: there is no .*train/emu with images"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_a_malicious_or_unusable_zip_is_refused_in_one_sentence_and_leaves_nothing(tmp_path, case):
    build, limits, message = MALICIOUS[case]
    data = build(image_bytes(tmp_path))
    with pytest.raises(ArchiveError, match=message) as info:
        unpack_image_zip(data, "evil.zip", limits=limits)
    text = str(info.value)
    assert isinstance(info.value, UserError) and text.startswith("evil.zip ") and "\n" not in text
    assert nothing_left(), list(paths.uploads_dir().rglob("*"))
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/tmp/abs.png").exists()


def test_plain_bmps_that_pack_well_are_not_taken_for_a_bomb(tmp_path):
    """Uncompressed pictures of plain shapes pack over 100 times; a small set of them is an ordinary data set."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            image = Image.new("RGB", (128, 128), (255, 255, 255))
            image.paste((0, 0, 0), (i, i, i + 40, i + 40))
            out = io.BytesIO()
            image.save(out, "BMP")
            zf.writestr(f"{'square' if i % 2 else 'other'}/{i}.bmp", out.getvalue())
    data = buffer.getvalue()
    assert sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist()) > 100 * len(data)
    assert unpack_image_zip(data, "shapes.zip").images == 40


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import core.image_zip

    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(core.image_zip.shutil, "disk_usage", lambda path: free)
    with pytest.raises(ArchiveError, match=r"^pets.zip needs \d.* for its images, but only 1000 bytes is free in "):
        unpack_image_zip(pets_zip(tmp_path), "pets.zip")  # found before anything is written
    assert nothing_left()
    monkeypatch.undo()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core.image_zip, "_copy_member", full)  # the disk filled up meanwhile
    with pytest.raises(ArchiveError, match=r"^The disk filled up while pets.zip was unpacked into .*; free some"):
        unpack_image_zip(pets_zip(tmp_path / "2"), "pets.zip")
    assert nothing_left()
    with pytest.raises(ArchiveError, match=r"^gone.zip is not a readable .zip archive \(No such file"):
        unpack_image_zip(tmp_path / "gone.zip", "gone.zip")


def test_images_the_trainer_would_refuse_are_skipped_with_their_reason(tmp_path):
    """Every image is checked as the data report does: a BMP or TIFF cut short (no end marker to look for) and an
    image over the pixel limit are skipped, each with why."""
    from PIL import Image

    img = image_bytes(tmp_path)
    whole = {fmt: (tmp_path / f"w.{fmt}") for fmt in ("bmp", "tiff")}
    for path in whole.values():
        Image.new("RGB", (64, 64), "red").save(path)
    big = tmp_path / "big.png"
    Image.new("1", (11_000, 10_000)).save(big)  # 110 megapixels: under Pillow's own bomb limit, over ResLens's
    cut = [(f"cat/cut.{fmt}", path.read_bytes()[: path.stat().st_size // 2]) for fmt, path in whole.items()]
    found = unpack_image_zip(_zip([("cat/a.png", img), ("cat/b.png", img), ("dog/c.png", img), ("dog/d.png", img),
                                   ("dog/big.png", big.read_bytes()), *cut]), "cut.zip")
    assert found.images == 4 and sorted(found.skipped) == [
        "cat/cut.bmp (damaged or truncated and cannot be decoded)",
        "cat/cut.tiff (damaged or truncated and cannot be decoded)",
        "dog/big.png (declares 11000x10000 pixels, more than the 100 megapixels ResLens decodes)"]


def test_a_class_with_no_val_folder_is_kept_with_no_validation_images(tmp_path):
    img = image_bytes(tmp_path)
    found = unpack_image_zip(_zip([(f"train/{c}/{i}.png", img) for c in ("bird", "cat", "dog") for i in "ab"]
                                  + [(f"val/{c}/a.png", img) for c in ("cat", "dog")]), "no-bird.zip")
    assert class_counts("imagefolder", found.folder, "val") == {"bird": 0, "cat": 1, "dog": 1}


def test_utf8_names_without_the_utf8_flag_keep_their_class_names(tmp_path):
    img = image_bytes(tmp_path)
    names = {"XXX/a.png": "猫/a.png", "XXX/b.png": "猫/b.png",  # placeholders as long as the UTF-8 bytes
             "dXXg/c.png": "dög/c.png", "dXXg/d.png": "dög/d.png"}
    assert all(len(k.encode()) == len(v.encode()) for k, v in names.items())
    data = _zip([(k, img) for k in names])
    for placeholder, real in names.items():  # zipfile would set the flag itself: write the bytes in by hand
        data = data.replace(placeholder.encode(), real.encode())
    assert not any(i.flag_bits & 0x800 for i in zipfile.ZipFile(io.BytesIO(data)).infolist())
    found = unpack_image_zip(data, "names.zip")
    assert sorted(class_counts("imagefolder", found.folder, "train")) == ["dög", "猫"]


def test_bytes_are_counted_while_extracting_even_past_the_declared_checks(tmp_path, monkeypatch):
    """Defence in depth: with the checks of declared sizes switched off, counting the bytes written still refuses."""
    from core import image_zip

    monkeypatch.setattr(image_zip, "_check_declared", lambda info, name, limits: None)
    img = image_bytes(tmp_path)
    with pytest.raises(ArchiveError, match="cat/a.png, which unpacks to more bytes than it declares or than the size"):
        unpack_image_zip(_zip([("cat/a.png", img), ("dog/b.png", img)]), "big.zip",
                         limits=ZipLimits(max_file_bytes=1000))
    assert nothing_left()


def test_a_stage_trains_on_an_unpacked_zip(tmp_path):
    from tests.test_engine import run_tiny
    from tests.test_imagefolder import CLASSES, tiny_stage
    from core.run_store import RunStore

    found = unpack_image_zip(pets_zip(tmp_path, prefix="", layout="split"), "pets.zip")
    assert found.folder == found.target and (found.folder / "train").is_dir()
    assert run_tiny(tiny_stage(found.folder), name="zipped") == "finished"
    assert RunStore().stages("zipped")[0]["class_names"] == CLASSES
