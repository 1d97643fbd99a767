"""Registry of the data sets ResLens trains on, each read in its real on-disk format.

``open_dataset(name, root, split)`` gives a ``LabeledImages``; ``class_counts`` gives images per class
without decoding any image; ``download`` fetches a set, only when the user asks. Every image file goes
through ``core.images.load_image`` (so grayscale Caltech photos reach the model as RGB).

Caltech-101 and Caltech-256 have no official split. ResLens splits them per class (stratified),
deterministically and identically on every machine: the files of a class are ordered by the SHA-256
of ``"{seed}/{class}/{file name}"``; the first ``round(val_fraction * n)`` of them (at least 1 and at
most ``n - 1`` when a class has ``n >= 2`` images; none when ``n == 1``) are ``val``, the rest ``train``.
With ``train_per_class=N`` (the Fei-Fei et al. protocol, e.g. N=30) the last ``min(N, n - 1)`` files in
that order are ``train`` and all others ``val``. Defaults: ``val_fraction=0.2``, ``seed=0``.

``imagefolder`` is a folder of your own images, and its ``root`` is that folder itself (for every other
set the root is the parent of a named folder). Two layouts: ``<root>/<class>/<images>`` (split by the same
hash as Caltech, with the same options) or ``<root>/train/<class>/...`` plus ``<root>/val/<class>/...``
(the folders are the split; split options are refused). Class names are the folder names; images are the
files ``core.images`` reads (``is_image_name``), also in sub-folders of a class; hidden files are skipped.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pickle
import shutil
import tarfile
import threading
import unicodedata
import urllib.request
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from core.images import SUPPORTED_EXTENSIONS, is_image_name, load_image
from core.paths import data_root, not_a_folder

SPLITS = ("train", "val")
# options every data set accepts; they concern how images are read (the image cache applies them)
COMMON_OPTIONS: dict[str, Any] = {"skip_unreadable": False}
IMAGE_SUFFIXES = (".jpg", ".jpeg")
DownloadProgress = Callable[[int, "int | None"], None]
OWN_FOLDER = "."  # DatasetInfo.folder of a set whose root is its own folder (imagefolder)
IMAGEFOLDER_LAYOUT = ("one folder of images per class (<root>/<class>/<image>), or <root>/train/<class>/<image> "
                      "plus <root>/val/<class>/<image>")
log = logging.getLogger("reslens.datasets")


class DatasetMissing(UserError, FileNotFoundError):
    """A data set is not on disk; the message says where ResLens looked and how to get it."""


class DatasetError(UserError, ValueError):
    """A data set name, split or option is wrong, or its files are malformed."""


class LabeledImages(Dataset):
    """Images with integer targets; ``__getitem__(i)`` is ``(transform(load_raw(i)), targets[i])``."""

    def __init__(self, classes: Sequence[str], targets: Sequence[int], transform: Callable | None = None,
                 class_labels: Sequence[str] | None = None, excluded: dict[str, int] | None = None,
                 notes: Sequence[str] = ()) -> None:
        self.classes: list[str] = list(classes)
        self.targets: list[int] = list(targets)
        self.transform = transform
        self.class_labels: list[str] = list(class_labels or classes)  # human-readable names, same order
        self.excluded: dict[str, int] = dict(excluded or {})  # folders on disk that are not classes
        self.notes: list[str] = list(notes)  # sentences on how the files were read (layout, a cut wnids.txt)

    def __len__(self) -> int:
        return len(self.targets)

    def load_raw(self, index: int) -> Image.Image:
        """The RGB image at ``index`` at its stored resolution (files beyond ``core.images.MAX_SIDE`` shrink)."""
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Where image ``index`` comes from (a file path, or ``name:split:index``)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_raw(index)
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def digest(self, root: str | os.PathLike[str] | None = None) -> str:
        """A short hash of which images this holds, in order, with their classes (file names taken relative to
        ``root``): an image added, removed, renamed, replaced by another name or moved to another class changes it."""
        base = os.path.realpath(os.path.expanduser(root)) if root else None
        h = hashlib.blake2b(digest_size=8)
        for index, target in enumerate(self.targets):
            name = self.source(index)
            if base and os.path.isabs(name):
                name = os.path.relpath(name, base)
            h.update(f"{target}\0{name}\0".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for target in self.targets:
            counts[self.classes[target]] += 1
        return counts


class ImageFiles(LabeledImages):
    """A ``LabeledImages`` whose images are files decoded by ``core.images.load_image``."""

    def __init__(self, files: Sequence[Path], targets: Sequence[int], classes: Sequence[str], **kwargs: Any) -> None:
        super().__init__(classes, targets, **kwargs)
        self.files: list[Path] = list(files)

    def load_raw(self, index: int) -> Image.Image:
        return load_image(self.files[index])

    def source(self, index: int) -> str:
        return str(self.files[index])


class ImageArrays(LabeledImages):
    """A ``LabeledImages`` held as one uint8 array of shape (N, H, W, 3) (CIFAR)."""

    def __init__(self, pixels: np.ndarray, targets: Sequence[int], classes: Sequence[str], tag: str,
                 **kwargs: Any) -> None:
        super().__init__(classes, targets, **kwargs)
        self.pixels = pixels
        self.tag = tag

    def load_raw(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index], mode="RGB")

    def source(self, index: int) -> str:
        return f"{self.tag}:{index}"


@dataclass(frozen=True)
class Listing:
    """What a split holds on disk: classes in target order and the image files of each, nothing decoded."""

    classes: list[str]
    files: dict[str, list[Path]]
    class_labels: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {c: len(self.files[c]) for c in self.classes}

    def to_dataset(self, transform: Callable | None) -> ImageFiles:
        pairs = [(path, t) for t, c in enumerate(self.classes) for path in self.files[c]]
        return ImageFiles([p for p, _ in pairs], [t for _, t in pairs], self.classes, transform=transform,
                          class_labels=self.class_labels or None, excluded=self.excluded, notes=self.notes)


@dataclass(frozen=True)
class DatasetInfo:
    """One registered data set: where it lives under the root, how to read, count and fetch it."""

    name: str
    title: str
    description: str
    folder: str | None  # path under the root that must exist; None for generated sets; OWN_FOLDER: the root
    url: str | None
    options: dict[str, Any]  # accepted options and their defaults
    opener: Callable[..., LabeledImages]  # (root, split, transform, **options)
    counter: Callable[..., dict[str, int]]  # (root, split, **options)
    fetcher: Callable[[Path, str], None] | None = None  # (root, url)
    archive: str | None = None  # file the fetcher downloads, relative to the root (for progress)

    @property
    def own_folder(self) -> bool:
        """Whether the root is the data set itself (imagefolder) rather than the parent of a named folder."""
        return self.folder == OWN_FOLDER


# ---------------------------------------------------------------- public API


def open_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 transform: Callable | None = None, **options: Any) -> LabeledImages:
    """The ``split`` (``"train"`` or ``"val"``) of data set ``name`` found under ``root``."""
    info, base, opts = _prepare(name, root, split, options)
    return info.opener(base, split, transform, **opts)


def class_counts(name: str, root: str | Path | None = None, split: str = "train", **options: Any) -> dict[str, int]:
    """Images per class of a split, counted from file lists or label arrays (no image is decoded)."""
    info, base, opts = _prepare(name, root, split, options)
    return info.counter(base, split, **opts)


def dataset_path(name: str, root: str | Path | None = None) -> Path | None:
    """The folder data set ``name`` must occupy under ``root`` (None for generated sets; the root itself for
    imagefolder, which has no default root)."""
    info = get_info(name)
    if info.own_folder:
        return _own_root(info, root)
    return _root(root) / info.folder if info.folder else None


def download(name: str, root: str | Path | None = None, progress: DownloadProgress | None = None) -> Path:
    """Fetch data set ``name`` into ``root`` unless it is already there; returns its folder.

    ``progress(done_bytes, total_bytes)`` is called about twice a second while the archive downloads
    (torchvision's downloader has no hook, so a background thread polls the growing file and calls
    ``progress`` from that thread; ``total_bytes`` is None when the server does not say).
    """
    info = get_info(name)
    base = _root(root)
    if info.own_folder:
        raise DatasetError(f"The {info.name} data set is a folder of your own images; there is nothing to download.")
    if info.fetcher is None or info.url is None:
        raise DatasetError(f"The {info.title} data set is generated by ResLens; there is nothing to download.")
    target = base / str(info.folder)
    if target.exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    before = {p for p in (base / str(info.archive), _top_folder(base, info)) if p.exists()}  # the user's: kept
    try:
        with _watch_download(base / str(info.archive), info.url, progress):
            info.fetcher(base, info.url)
    except BaseException as exc:  # a failure, or Ctrl-C / a stop: nothing partial may pass for the data set
        _remove_partial(base, info, before)
        if isinstance(exc, (OSError, RuntimeError, zipfile.BadZipFile, tarfile.TarError)):
            raise DatasetError(f"Downloading {info.title} from {info.url} failed: {exc}. Or fetch {info.url} "
                               f"yourself and unpack it so that {target} exists.") from exc
        raise
    if not target.exists():
        raise DatasetError(f"Downloading {info.title} finished but {target} is still missing.")
    return target


def _top_folder(base: Path, info: DatasetInfo) -> Path:
    """The folder under the root that a data set's files go into (``caltech101`` of
    ``caltech101/101_ObjectCategories``)."""
    return base / Path(str(info.folder)).parts[0]


def _remove_partial(base: Path, info: DatasetInfo, before: set[Path]) -> None:
    """What a download cut short made: the archive (it would be "found" next time) and the half-unpacked folder (it
    would pass for the data set), or the whole top folder when the download made it (torchvision unpacks inner
    archives beside the data set); nothing that was there ``before``."""
    archive, top = base / str(info.archive), _top_folder(base, info)
    if archive not in before:
        archive.unlink(missing_ok=True)
    shutil.rmtree(top if top not in before else base / str(info.folder), ignore_errors=True)


@contextmanager
def _watch_download(archive: Path, url: str, progress: DownloadProgress | None) -> Iterator[None]:
    """Call ``progress(done, total)`` every half second while ``archive`` grows, and once at the end."""
    if progress is None:
        yield
        return
    stop, seen = threading.Event(), {"done": 0, "total": None}

    def poll() -> None:
        seen["total"] = _content_length(url)
        while not stop.wait(0.5):
            seen["done"] = max(seen["done"], archive.stat().st_size if archive.exists() else 0)
            progress(seen["done"], seen["total"])

    thread = threading.Thread(target=poll, name="reslens-download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress(seen["total"] or seen["done"], seen["total"])


def _content_length(url: str) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
            return int(response.headers["Content-Length"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DatasetError(f"Unknown data set {name!r}; choose one of: {', '.join(DATASETS)}.")
    return DATASETS[name]


def _root(root: str | Path | None) -> Path:
    return Path(root).expanduser().resolve() if root is not None else data_root()


def _prepare(name: str, root: str | Path | None, split: str,
             options: dict[str, Any]) -> tuple[DatasetInfo, Path, dict[str, Any]]:
    info = get_info(name)
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r} for {name}; choose 'train' or 'val'.")
    unknown = sorted(set(options) - set(info.options) - set(COMMON_OPTIONS))
    if unknown:
        accepted = ", ".join([*info.options, *COMMON_OPTIONS])
        raise DatasetError(f"Data set {name} has no option {unknown[0]!r} (its options: {accepted}).")
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    if own.get("val_fraction") is not None and own.get("train_per_class") is not None:
        raise DatasetError(f"Give {name} val_fraction or train_per_class, not both: train_per_class makes the split "
                           "by itself (that many training images per class, the rest for validation).")
    if info.own_folder:
        base = _own_root(info, root)
        if base.is_file() and base.suffix.lower() == ".zip":
            raise DatasetMissing(f"{base} is a .zip file, not a folder: unpack it, or drop it on the Train page, "
                                 "which unpacks it safely.")
        if not base.is_dir():
            raise DatasetMissing(f"{base} {not_a_folder(base)}; the root of {info.name} must be the folder that "
                                 f"holds your images: {IMAGEFOLDER_LAYOUT}.")
    else:
        base = _root(root)
        if info.folder and base.exists() and not base.is_dir():
            raise DatasetMissing(f"{base} {not_a_folder(base)}; the root of {info.name} is the folder that holds "
                                 f"{info.folder}.")
        if info.folder and not (base / info.folder).exists():
            raise DatasetMissing(_missing_message(info, base))
    return info, base, {**info.options, **own}


def _own_root(info: DatasetInfo, root: str | Path | None) -> Path:
    """The root of a set that is its own folder: it must be given (the data root is never meant)."""
    if root is None:
        raise DatasetError(f"The {info.name} data set needs a root: the folder that holds your images, "
                           f"{IMAGEFOLDER_LAYOUT}.")
    return _root(root)


def _missing_message(info: DatasetInfo, root: Path) -> str:
    where = root / str(info.folder)
    better = _intended_root(str(info.folder), root)
    if better is not None:
        return (f"The {info.title} data set was not found at {where}, but it is at {better / str(info.folder)}: "
                f"pass {better} as the root (the folder that holds {info.folder}).")
    return (f"The {info.title} data set was not found at {where}; get it with "
            f"`python -m train data {info.name} --root {root} --download` "
            f"(or fetch {info.url} yourself and unpack it so that {where} exists).")


def _intended_root(folder: str, root: Path) -> Path | None:
    """The ancestor of ``root`` that does hold ``folder`` when the user pointed inside the data set."""
    parts = Path(folder).parts
    if root.name not in parts or parts.index(root.name) >= len(root.parents):
        return None
    candidate = root.parents[parts.index(root.name)]
    return candidate if (candidate / folder).exists() else None


# ---------------------------------------------------------------- Caltech split


def split_files(files: Sequence[Path], class_name: str, split: str, *, val_fraction: float = 0.2,
                seed: int = 0, train_per_class: int | None = None) -> list[Path]:
    """The files of one class that fall in ``split`` (see the module docstring for the rule)."""
    _check_split_options(val_fraction, train_per_class)
    order = sorted(files, key=lambda p: hashlib.sha256(f"{seed}/{class_name}/{p.name}".encode()).hexdigest())
    n_val = _val_size(len(order), val_fraction, train_per_class)
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return sorted(chosen)


def _val_size(n: int, val_fraction: float, train_per_class: int | None) -> int:
    if n < 2:
        return 0
    if train_per_class is not None:
        return n - min(train_per_class, n - 1)
    return min(n - 1, max(1, math.floor(val_fraction * n + 0.5)))


def _check_split_options(val_fraction: float, train_per_class: int | None) -> None:
    if not 0.0 < float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}.")
    if train_per_class is not None and int(train_per_class) < 1:
        raise DatasetError(f"train_per_class must be at least 1, not {train_per_class}.")


# ---------------------------------------------------------------- Caltech-101 / Caltech-256


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caltech_listing(categories: Path, skip: set[str], split: str, label: Callable[[str], str],
                     **split_options: Any) -> Listing:
    images = {p.name: _image_files(p) for p in sorted(categories.iterdir()) if p.is_dir()}
    classes = [f for f, found in images.items() if f not in skip and found]
    empty = [f for f, found in images.items() if f not in skip and not found]
    if not classes:
        skipped = sorted(skip & set(images))
        why = (f" (only {', '.join(skipped)}, which is not a class by default)." if skipped and not empty
               else f": it may be partly unpacked; delete {categories.parent} and download it again.")
        raise DatasetError(f"{categories} holds no class folders with images{why}")
    notes = [f"{len(empty)} class folder(s) hold no images and are left out ({', '.join(empty[:5])}"
             f"{', ...' if len(empty) > 5 else ''}): the data set may be partly unpacked; delete {categories.parent} "
             "and download it again."] if empty else []
    excluded = {f: len(found) for f, found in images.items() if f in skip or not found}
    files = {c: split_files(images[c], c, split, **split_options) for c in classes}
    return Listing(classes, files, [label(c) for c in classes], excluded, notes)


def _caltech101_listing(root: Path, split: str, **split_options: Any) -> Listing:
    categories = root / "caltech101" / "101_ObjectCategories"
    return _caltech_listing(categories, {"BACKGROUND_Google"}, split, str, **split_options)


def _caltech256_label(folder: str) -> str:
    """``"145.motorbikes-101"`` -> ``"motorbikes"``."""
    name = folder.split(".", 1)[-1]
    return name[: -len("-101")] if name.endswith("-101") else name


def _caltech256_listing(root: Path, split: str, include_clutter: bool = False, **split_options: Any) -> Listing:
    """Caltech-256: 256 object classes; ``257.clutter`` (background clutter) is a class only if asked."""
    categories = root / "caltech256" / "256_ObjectCategories"
    skip = set() if include_clutter else {"257.clutter"}
    return _caltech_listing(categories, skip, split, _caltech256_label, **split_options)


# ---------------------------------------------------------------- Tiny ImageNet


def _require_file(path: Path) -> None:
    """Refuse a FIFO, device or folder where a data file belongs (reading a FIFO would block forever)."""
    if path.exists() and not path.is_file():
        raise DatasetError(f"{path} is not a regular file (a folder, pipe or device).")


def _read_lines(path: Path) -> list[str]:
    _require_file(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the Tiny ImageNet folder is incomplete.")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tiny_labels(base: Path, wnids: list[str]) -> list[str]:
    """The first English name of each WordNet id (``words.txt``), or the id itself if it has none."""
    wanted, names = set(wnids), {}
    words = base / "words.txt"
    for line in (_read_lines(words) if words.exists() else []):
        wnid, _, text = line.partition("\t")
        if wnid in wanted:
            names[wnid] = text.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def _tiny_val_files(base: Path, wnids: list[str]) -> dict[str, list[Path]]:
    images = base / "val" / "images"
    present = {p.name for p in images.iterdir()} if images.is_dir() else set()
    files: dict[str, list[Path]] = {w: [] for w in wnids}
    for line in _read_lines(base / "val" / "val_annotations.txt"):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in files:
            raise DatasetError(f"val_annotations.txt line {line!r} does not name a class (a folder of train/).")
        if parts[0] not in present:
            raise DatasetError(f"val_annotations.txt names {parts[0]}, which is not in {images}.")
        files[parts[1]].append(images / parts[0])
    return {w: sorted(f) for w, f in files.items()}


def _tiny_train_files(base: Path, wnids: list[str]) -> dict[str, list[Path]]:
    folders = {w: base / "train" / w / "images" for w in wnids}
    for wnid, folder in folders.items():
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing: every class folder of train/ needs its images/ ({wnid}).")
    return {w: _image_files(folder) for w, folder in folders.items()}


def _tiny_classes(base: Path) -> tuple[list[str], list[str]]:
    """(classes, notes): the class folders of train/; a ``wnids.txt`` that disagrees is said once, not used."""
    wnids = sorted(_read_lines(base / "wnids.txt"))
    train = base / "train"
    folders = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if train.is_dir() else []
    if not folders:
        raise DatasetError(f"{train} holds no class folders: the Tiny ImageNet folder is incomplete.")
    if folders == wnids:
        return wnids, []
    note = (f"{base / 'wnids.txt'} lists {len(wnids)} classes but {train} has {len(folders)} class folders; "
            "ResLens uses the train folders as the classes.")
    _say_once(note)
    return folders, [note]


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    """Log a warning about the data on disk once per process (the listing is read many times)."""
    log.warning(message)


def _tiny_listing(root: Path, split: str) -> Listing:
    base = root / "tiny-imagenet-200"
    wnids, notes = _tiny_classes(base)
    files = _tiny_train_files(base, wnids) if split == "train" else _tiny_val_files(base, wnids)
    return Listing(wnids, files, _tiny_labels(base, wnids), notes=notes)


# ---------------------------------------------------------------- image folders (your own images)


def skipped_folder(name: str) -> bool:
    """Hidden folders and macOS's zip resource forks are never classes nor searched for images."""
    return name.startswith(".") or name == "__MACOSX"


_JUNK_FILES = {"thumbs.db", "desktop.ini"}  # what file managers leave in folders


def _images_under(folder: Path, ignored: Counter[str] | None = None, data_set: Path | None = None) -> list[Path]:
    """Image files in ``folder`` and its sub-folders, sorted: hidden files and folders skipped, linked sub-folders
    followed unless they lead elsewhere into the image folder ``data_set`` (another class's or split's images
    would count twice: validation images in training). ``ignored`` counts the other files by extension."""
    found: list[Path] = []
    top = os.path.realpath(folder)
    inside, seen = os.path.realpath(data_set if data_set is not None else folder), {top}
    for here, dirs, names in os.walk(folder, onerror=_raise, followlinks=True):
        dirs[:] = [d for d in dirs if not skipped_folder(d) and _own_folder(os.path.join(here, d), top, inside, seen)]
        _check_utf8(here, names)
        for name in names:
            if is_image_name(name):
                found.append(Path(here, name))
            elif ignored is not None and not (name.startswith(".") or name.lower() in _JUNK_FILES):
                ignored[Path(name).suffix.lower() or "without extension"] += 1
    return sorted(found)


def _own_folder(path: str, top: str, inside: str, seen: set[str]) -> bool:
    """Whether the walk of class folder ``top`` enters sub-folder ``path``: not walked yet and, where it is a link,
    not one to elsewhere in the image folder ``inside`` or to a folder holding it (a loop)."""
    real = os.path.realpath(path)
    if real in seen or (not _within(real, top) and (_within(real, inside) or _within(inside, real))):
        return False
    seen.add(real)
    return True


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_utf8(here: str, names: list[str]) -> None:
    """Refuse a name that is not UTF-8 (from an old archive or a network share): ResLens cannot store it."""
    for path in (here, *(os.path.join(here, n) for n in names)):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "replace")
            raise DatasetError(f"{shown} has a name that is not UTF-8 text, so ResLens cannot store it; rename it "
                               "(convmv converts a folder's names to UTF-8).") from None


def _raise(exc: OSError) -> None:
    raise exc


def _class_folders(folder: Path, data_set: Path) -> tuple[dict[str, list[Path]], dict[str, int], list[str]]:
    """(class -> its images, for sub-folders holding images; other sub-folder -> 0; notes on them), classes
    sorted; ``data_set`` is the image folder they belong to."""
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and not skipped_folder(p.name))
    ignored: Counter[str] = Counter()
    files = {p.name: _images_under(p, ignored, data_set) for p in folders}
    classes = {c: f for c, f in files.items() if f}
    for name in classes:
        _check_class_name(folder / name)
    notes = [*_linked_classes(folder, classes), *_look_alike_classes(folder, classes), *_ignored_files(folder, ignored)]
    return classes, {c: 0 for c, f in files.items() if not f}, notes


def _look_alike_classes(folder: Path, classes: Iterable[str]) -> list[str]:
    """A note for class folders whose names differ only in their Unicode form (copied between macOS and Linux)."""
    by_form: dict[str, list[str]] = {}
    for name in classes:
        by_form.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    return [f"Class folders {' and '.join(ascii(n) for n in names)} in {folder} look alike: one name written in "
            "two Unicode forms (copied between macOS and Linux?), so they are two classes. Merge them into one "
            "folder." for names in by_form.values() if len(names) > 1]


def _ignored_files(folder: Path, ignored: Counter[str]) -> list[str]:
    """A note on the files in class folders that are not images ResLens reads (they are left out)."""
    if not ignored:
        return []
    kinds = ", ".join(f"{n} {kind}" for kind, n in ignored.most_common(5)) + (", ..." if len(ignored) > 5 else "")
    heic = " Convert HEIC/HEIF photos to JPEG to use them." if {".heic", ".heif"} & set(ignored) else ""
    return [f"{ignored.total()} file(s) in the class folders of {folder} are not images ResLens reads "
            f"({', '.join(SUPPORTED_EXTENSIONS)}) and are left out: {kinds}.{heic}"]


def _check_class_name(class_folder: Path) -> None:
    """Refuse a class name with a control character (a tab, a newline, a terminal escape): reports would break."""
    if any(unicodedata.category(ch) == "Cc" for ch in class_folder.name):
        raise DatasetError(f"Class folder {class_folder.name!r} in {class_folder.parent} has a control character "
                           "(a tab, a newline or an escape) in its name; rename it.")


def _split_layout(root: Path, split: str, options: dict[str, Any]) -> Listing:
    """``<root>/train/<class>`` and ``<root>/val/<class>``: the folders are the split."""
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise DatasetError(f"{root} has its own train/ and val/ folders, so the split option {given[0]} does not "
                           "apply; remove it (split options are for a folder of class folders).")
    train, empty, train_notes = _class_folders(root / "train", root)
    classes = sorted(train)
    if not classes:
        raise DatasetError(f"{root / 'train'} holds no class folders with images: expected "
                           "train/<class>/<image> and val/<class>/<image>.")
    found, _, notes = _class_folders(root / split, root) if split == "val" else (train, empty, train_notes)
    strays = sorted(set(found) - set(classes))
    if strays:
        twin = next((c for c in classes if unicodedata.normalize("NFC", c) == unicodedata.normalize("NFC", strays[0])),
                    None)
        if twin is not None:
            raise DatasetError(f"{root / 'val' / strays[0]} and {root / 'train' / twin} look alike but are not one "
                               f"class: {ascii(strays[0])} and {ascii(twin)} are one name written in two Unicode "
                               "forms (copied between macOS and Linux?). Rename one of the two folders.")
        raise DatasetError(f"{root / 'val' / strays[0]} is not a class: there is no {root / 'train' / strays[0]} "
                           "with images.")
    others = {p.name: len(_images_under(p)) for p in sorted(root.iterdir())
              if p.is_dir() and p.name not in ("train", "val") and not skipped_folder(p.name)}
    shared = next((c for c in classes if _same_folder(root / "train" / c, root / "val" / c)), None)
    if shared is not None:
        raise DatasetError(f"{root / 'val' / shared} and {root / 'train' / shared} are the same folder (a link): "
                           "validation would score the training images. Give val/ its own images.")
    files = {c: found.get(c, []) for c in classes}
    note = f"Split: the train/ and val/ folders of {root}."
    unscored = [c for c in classes if not files[c]] if split == "val" else []
    if unscored:
        notes.append(f"{len(unscored)} class(es) have no images in {root / 'val'}, so their accuracy cannot be "
                     f"measured: {', '.join(unscored[:8])}{' ...' if len(unscored) > 8 else ''}.")
    return Listing(classes, files, excluded={**empty, **others}, notes=[note, *notes])


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths are one folder (through links); a missing one is no folder (a class with no val/ folder
    has no validation images)."""
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _flat_layout(root: Path, split: str, options: dict[str, Any]) -> Listing:
    """``<root>/<class>``: split per class by the Caltech hash (``split_files``)."""
    found, empty, notes = _class_folders(root, root)
    split_options = {k: default if options.get(k) is None else options[k] for k, default in SPLIT_OPTIONS.items()}
    files = {c: split_files(f, c, split, **split_options) for c, f in found.items()}
    how = (f"the last {split_options['train_per_class']} per class train" if split_options["train_per_class"]
           else f"{100 * split_options['val_fraction']:g}% of each class held out")
    note = f"Split: by a hash of seed/class/file ({how}, seed {split_options['seed']})."
    loose = _loose_images(root)
    stray = [f"{loose} image{'s lie' if loose != 1 else ' lies'} directly in {root}, outside any class folder: "
             "not used."] if loose else []
    return Listing(sorted(files), files, excluded=empty, notes=[note, *stray, *notes])


def _linked_classes(folder: Path, classes: Iterable[str]) -> list[str]:
    """A note for each group of class folders that are one folder (symbolic links): its images count in each."""
    by_target: dict[str, list[str]] = {}
    for name in classes:
        by_target.setdefault(os.path.realpath(folder / name), []).append(name)
    return [f"Class folders {', '.join(names[:-1])} and {names[-1]} in {folder} are the same folder ({target}, "
            "through links): its images count in each of these classes." for target, names in by_target.items()
            if len(names) > 1]


def _imagefolder_listing(root: Path, split: str, **options: Any) -> Listing:
    try:
        os.listdir(root)  # an unreadable root is named as such, not as its train/ folder
        listing = _imagefolder_layout(root, split, options)
    except OSError as exc:
        raise DatasetError(f"Cannot read {exc.filename or root}: {(exc.strerror or str(exc)).lower()}. Every folder "
                           "of an image folder must be readable, or its images would be left out silently.") from None
    if len(listing.classes) < 2:
        found = f"only {listing.classes[0]!r}" if listing.classes else "none"
        loose = _loose_images(root)
        outside = f"; {loose} images lie directly in it, outside any class folder" if loose else ""
        raise DatasetError(f"{root} needs at least two class folders with images ({found} found{outside}): "
                           f"expected {IMAGEFOLDER_LAYOUT}.")
    if split == "val" and not any(listing.files.values()):
        why = ("its val/ folder holds no images of the classes in train/" if (root / "train").is_dir()
               else "every class has a single image, so none is held out")
        raise DatasetError(f"{root} has no validation images: {why}. Validation needs at least one image; give "
                           "classes two images or more.")
    return listing


def _loose_images(root: Path) -> int:
    """Images lying directly in an image folder's root, outside any class folder (they are not used)."""
    return sum(1 for p in root.iterdir() if p.is_file() and is_image_name(p.name))


def _imagefolder_layout(root: Path, split: str, options: dict[str, Any]) -> Listing:
    named = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    if {"train", "val"} <= set(named) and (named["train"], named["val"]) != ("train", "val"):
        raise DatasetError(f"{root} has {named['train']}/ and {named['val']}/ folders: name them train/ and val/ "
                           "(lower case) to use them as the split, or they are taken for two classes.")
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        return _split_layout(root, split, options)
    if (train.is_dir() or val.is_dir()) and _class_folders(train if train.is_dir() else val, root)[0]:
        there, absent = ("train", "val") if train.is_dir() else ("val", "train")
        raise DatasetError(f"{root} has a {there}/ folder of classes but no {absent}/ folder; give both, or "
                           "put the class folders directly in the root.")
    return _flat_layout(root, split, options)


# ---------------------------------------------------------------- CIFAR-100


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads CIFAR's python pickles but refuses any global other than numpy's array rebuilding."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_cifar_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    _require_file(path)
    try:
        with path.open("rb") as fh:
            raw = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path} is not a readable CIFAR-100 pickle ({exc}).") from exc
    entry = {_text(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{path} lacks the CIFAR-100 key {missing[0]!r}.")
    return entry


def _cifar_classes(base: Path) -> list[str]:
    return [_text(n) for n in _read_cifar_pickle(base / "meta", ("fine_label_names",))["fine_label_names"]]


def _cifar_labels(base: Path, split: str, n_classes: int) -> tuple[dict[str, Any], list[int]]:
    path = base / ("train" if split == "train" else "test")
    entry = _read_cifar_pickle(path, ("data", "fine_labels"))
    labels = [int(x) for x in entry["fine_labels"]]
    if labels and not 0 <= min(labels) <= max(labels) < n_classes:
        raise DatasetError(f"{path} has fine_labels outside 0..{n_classes - 1}.")
    return entry, labels


def _cifar_open(root: Path, split: str, transform: Callable | None) -> ImageArrays:
    """CIFAR-100 (python version): ``val`` is the official test set."""
    base = root / "cifar-100-python"
    classes = _cifar_classes(base)
    entry, labels = _cifar_labels(base, split, len(classes))
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape != (len(labels), 3 * 32 * 32):
        raise DatasetError(f"{base / split} holds data of shape {data.shape}, not ({len(labels)}, 3072).")
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageArrays(pixels, labels, classes, f"cifar100:{split}", transform=transform)


def _cifar_counts(root: Path, split: str) -> dict[str, int]:
    base = root / "cifar-100-python"
    classes = _cifar_classes(base)
    counts = dict.fromkeys(classes, 0)
    for label in _cifar_labels(base, split, len(classes))[1]:
        counts[classes[label]] += 1
    return counts


# ---------------------------------------------------------------- registry plumbing


def _files_set(listing: Callable[..., Listing]) -> tuple[Callable[..., LabeledImages], Callable[..., dict[str, int]]]:
    """The opener and counter of a set that is a folder of image files, both from the same listing."""

    def opener(root: Path, split: str, transform: Callable | None, **options: Any) -> LabeledImages:
        return listing(root, split, **options).to_dataset(transform)

    def counter(root: Path, split: str, **options: Any) -> dict[str, int]:
        return listing(root, split, **options).counts()

    return opener, counter


def _synthetic_set(variant: str) -> tuple[Callable[..., LabeledImages], Callable[..., dict[str, int]]]:
    def opener(root: Path, split: str, transform: Callable | None, **options: Any) -> LabeledImages:
        from core.synthetic import ShapesDataset

        given = {k: v for k, v in options.items() if v is not None}  # None: the generator's default
        return ShapesDataset(variant, split, transform=transform, **given)

    def counter(root: Path, split: str, seed: int = 0, **options: Any) -> dict[str, int]:
        from core.synthetic import shapes_class_counts

        return shapes_class_counts(variant, split, seed=seed)

    return opener, counter


def _fetch_archive(filename: str) -> Callable[[Path, str], None]:
    def fetch(root: Path, url: str) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(url, download_root=str(root), filename=filename, remove_finished=True)

    return fetch


def _fetch_torchvision(class_name: str) -> Callable[[Path, str], None]:
    def fetch(root: Path, url: str) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, class_name)(str(root), download=True)

    return fetch


SPLIT_OPTIONS = {"val_fraction": 0.2, "seed": 0, "train_per_class": None}  # the stratified split's defaults
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# the archives torchvision's Caltech101/Caltech256 download (named here for messages and progress totals)
CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
CALTECH256_URL = "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"


def _registry() -> dict[str, DatasetInfo]:
    sets = [
        DatasetInfo("tinyimagenet", "Tiny ImageNet",
                    "200 ImageNet classes at 64x64 px, 500 train and 50 val images per class (official val split).",
                    "tiny-imagenet-200", TINY_IMAGENET_URL, {}, *_files_set(_tiny_listing),
                    _fetch_archive("tiny-imagenet-200.zip"), "tiny-imagenet-200.zip"),
        DatasetInfo("cifar100", "CIFAR-100",
                    "100 classes of 32x32 photos, 500 train and 100 val (the official test set) images per class.",
                    "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", {},
                    _cifar_open, _cifar_counts, _fetch_torchvision("CIFAR100"), "cifar-100-python.tar.gz"),
        DatasetInfo("caltech101", "Caltech-101",
                    "101 object classes (BACKGROUND_Google is not a class), 31 to 800 photos each, some grayscale; "
                    "seeded stratified split (val_fraction, or train_per_class as in Fei-Fei et al.).",
                    "caltech101/101_ObjectCategories", CALTECH101_URL,
                    dict(SPLIT_OPTIONS), *_files_set(_caltech101_listing),
                    _fetch_torchvision("Caltech101"), "caltech101/caltech-101.zip"),
        DatasetInfo("caltech256", "Caltech-256",
                    "256 object classes in 257 folders: 257.clutter is not a class unless include_clutter=True; "
                    "seeded stratified split (val_fraction, or train_per_class as in Griffin et al.).",
                    "caltech256/256_ObjectCategories", CALTECH256_URL,
                    {**SPLIT_OPTIONS, "include_clutter": False}, *_files_set(_caltech256_listing),
                    _fetch_torchvision("Caltech256"), "caltech256/256_ObjectCategories.tar"),
        DatasetInfo("imagefolder", "Image folder",
                    "Your own images: root is the folder, " + IMAGEFOLDER_LAYOUT + "; class names are the folder "
                    "names; a flat folder is split like Caltech (val_fraction, seed, train_per_class).",
                    OWN_FOLDER, None, {"val_fraction": None, "seed": None, "train_per_class": None},
                    *_files_set(_imagefolder_listing)),
        DatasetInfo("shapes", "Shapes demo", "10 balanced classes of generated shapes with known boxes, no files.",
                    None, None, {"seed": 0, "image_size": None}, *_synthetic_set("shapes")),
        DatasetInfo("shapes-lt", "Shapes long-tail demo",
                    "10 classes of generated shapes whose sizes follow a long tail (largest/smallest 25), no files.",
                    None, None, {"seed": 0, "image_size": None}, *_synthetic_set("shapes-lt")),
    ]
    return {info.name: info for info in sets}


DATASETS: dict[str, DatasetInfo] = _registry()
