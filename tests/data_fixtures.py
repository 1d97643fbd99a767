"""Small fixture trees in the exact on-disk layout of each real data set, for any test to build.

Each ``make_*`` writes under ``root`` (a temporary folder) and returns ``root``, the value to pass as
``--root`` / ``open_dataset(root=...)``. Images are tiny JPEGs; some are grayscale (mode ``L``), as in
Caltech. ``CALTECH_*_SIZES`` say how many images each class folder gets, so tests can check counts.
"""
from __future__ import annotations

import functools
import http.server
import pickle
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

CALTECH101_SIZES = {"Faces": 6, "Leopards": 4, "accordion": 3, "airplanes": 5, "yin_yang": 1,
                    "BACKGROUND_Google": 2}
CALTECH256_SIZES = {"001.ak47": 5, "002.american-flag": 3, "145.motorbikes-101": 4, "257.clutter": 2}
TINY_WNIDS = ("n01443537", "n01629819", "n02123045")
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra",
              "n02123045": "tabby, tabby cat", "n09999999": "unused entry"}
TINY_TRAIN_PER_CLASS = 4
TINY_VAL = (("val_0.JPEG", "n02123045"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n02123045"),
            ("val_3.JPEG", "n01629819"), ("val_4.JPEG", "n02123045"))
CIFAR_CLASSES = ("apple", "aquarium_fish", "baby")
CIFAR_TRAIN_LABELS = (0, 1, 2, 0, 1, 0, 2, 0)
CIFAR_TEST_LABELS = (2, 1, 0, 2)


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (24, 16), gray: bool = False) -> Path:
    """A small noisy JPEG (RGB, or mode L when ``gray``)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0]) if gray else (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L" if gray else "RGB").save(path, "JPEG", quality=80)
    return path


IMAGEFOLDER_SIZES = {"cat": 5, "dog": 4, "owl": 3}  # flat layout, or the train/ folders of the split layout
IMAGEFOLDER_VAL_SIZES = {"cat": 2, "dog": 1, "owl": 1}  # the val/ folders of the split layout
IMAGE_FORMATS = {"jpg": "JPEG", "PNG": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF", "TIFF": "TIFF",
                 "jpeg": "JPEG"}  # suffix (some upper case) -> Pillow format: every format ResLens reads


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """A small noisy RGB image in the format its suffix names (see ``IMAGE_FORMATS``)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    image.save(path, IMAGE_FORMATS[path.suffix[1:]])
    return path


def _class_images(folder: Path, sizes: dict[str, int], seed: int) -> None:
    """``folder/<class>/<class>_<i>.<suffix>``, suffixes cycling through every format, plus files that are
    not images (a text file, a hidden image, a .DS_Store) that a loader must skip."""
    suffixes, written = list(IMAGE_FORMATS), 0
    for k, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            write_image(folder / name / f"{name}_{i}.{suffixes[written % len(suffixes)]}", seed + 100 * k + i)
            written += 1
        (folder / name / "notes.txt").write_text("not an image\n")
        (folder / name / ".DS_Store").write_bytes(b"\0\1")
        write_image(folder / name / f".hidden_{name}.jpg", seed + 100 * k + 99)


def make_imagefolder(root: Path, layout: str = "flat", sizes: dict[str, int] | None = None,
                     val_sizes: dict[str, int] | None = None) -> Path:
    """An image folder of your own: ``root/<class>/*`` (``layout="flat"``) or ``root/train/<class>/*`` plus
    ``root/val/<class>/*`` (``layout="split"``); returns ``root``, the value to pass as imagefolder's root."""
    if layout == "flat":
        _class_images(root, sizes or IMAGEFOLDER_SIZES, 0)
    else:
        _class_images(root / "train", sizes or IMAGEFOLDER_SIZES, 0)
        _class_images(root / "val", val_sizes or IMAGEFOLDER_VAL_SIZES, 5000)
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    """``archive``: every file under ``folder`` (hidden ones too), stored as ``prefix + relative path``."""
    import zipfile

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def _caltech_tree(categories: Path, sizes: dict[str, int], name: str) -> None:
    for k, (folder, n) in enumerate(sizes.items()):
        prefix = folder.split(".")[0] + "_" if name == "256" else "image_"
        for i in range(1, n + 1):
            write_jpeg(categories / folder / f"{prefix}{i:04d}.jpg", seed=100 * k + i, gray=(i == 2))


def make_caltech101(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """``root/caltech101/101_ObjectCategories/<class>/image_NNNN.jpg`` (image 2 of each class is grayscale)."""
    _caltech_tree(root / "caltech101" / "101_ObjectCategories", sizes or CALTECH101_SIZES, "101")
    return root


def make_caltech256(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """``caltech256/256_ObjectCategories/NNN.name/NNN_NNNN.jpg``, plus a stray non-image file as in the real set."""
    categories = root / "caltech256" / "256_ObjectCategories"
    _caltech_tree(categories, sizes or CALTECH256_SIZES, "256")
    (categories / "001.ak47" / "RENAME2").write_text("not an image\n")
    return root


def make_tinyimagenet(root: Path) -> Path:
    """``root/tiny-imagenet-200`` with wnids/words, train/<wnid>/images, val/images + val_annotations.txt."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(TINY_WNIDS)))  # not sorted on disk
    (base / "words.txt").write_text("".join(f"{w}\t{text}\n" for w, text in TINY_WORDS.items()))
    for k, wnid in enumerate(TINY_WNIDS):
        boxes = []
        for i in range(TINY_TRAIN_PER_CLASS):
            write_jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 10 * k + i, (64, 64), gray=(i == 1))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    for i, (name, wnid) in enumerate(TINY_VAL):
        write_jpeg(base / "val" / "images" / name, 1000 + i, (64, 64))
    (base / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t1\t2\t50\t60\n" for n, w in TINY_VAL))
    write_jpeg(base / "test" / "images" / "test_0.JPEG", 5000, (64, 64))
    return root


def _cifar_batch(labels: tuple[int, ...], seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    n = len(labels)
    return {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": b"training batch 1 of 1",
            b"fine_labels": list(labels), b"coarse_labels": [0] * n,
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)}


def make_cifar100(root: Path) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: pickles with CIFAR's real keys (bytes, as Python 2 wrote them)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    files = {"train": _cifar_batch(CIFAR_TRAIN_LABELS, 1), "test": _cifar_batch(CIFAR_TEST_LABELS, 2),
             "meta": {b"fine_label_names": [c.encode() for c in CIFAR_CLASSES], b"coarse_label_names": [b"fruit"]}}
    for name, content in files.items():
        (base / name).write_bytes(pickle.dumps(content, protocol=2))
    return root


@contextmanager
def serve_tinyimagenet_zip(workdir: Path) -> Iterator[tuple[str, Path]]:
    """Serve a zipped Tiny ImageNet fixture over loopback HTTP: yields (url, archive path)."""
    source = make_tinyimagenet(workdir / "src")
    served = workdir / "served"
    shutil.make_archive(str(served / "tiny-imagenet-200"), "zip", source, "tiny-imagenet-200")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tiny-imagenet-200.zip", served / "tiny-imagenet-200.zip"
    finally:
        server.shutdown()
        server.server_close()
