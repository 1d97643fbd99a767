"""ResLens checkpoints: written atomically, read with ``weights_only=True``, refused with one clear sentence.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (see DEVELOPERS.md for the keys).
"""
from __future__ import annotations

import errno
import glob
import math
import mmap
import os
import pickle
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.sizes import iec_bytes
from core.models import Preprocessing, build_model
from core.tempfiles import locked_temp, sweep_stale

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "num_classes", "class_names", "preprocessing", "model")
IMAGE_SIZES = (16, 1024)  # the input sizes a checkpoint may ask for: those the trainer accepts (train/config.py)


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be written or read; the message says which file and why."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model, without the weights."""

    path: Path
    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    epoch: int | None = None
    stage_name: str | None = None
    run_name: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] | None = None  # out-of-distribution thresholds (core.ood), absent in older checkpoints
    batches_done: int = 0  # > 0: saved in the middle of ``epoch`` (a stopped run's last.pt), after that many batches

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a locked temporary file in the same folder, fsync, then rename.

    A crash or a full disk during the write leaves the previous file at ``path`` untouched; temporary
    files that a dead writer left in the folder are removed first (``core.tempfiles``). A file rewritten keeps its
    permissions, and a symbolic link stays one: the file it points to is rewritten.
    """
    given = path = Path(path)
    if path.is_symlink() and path.exists():  # a dangling link is replaced, not followed into a missing folder
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    payload = {**payload, "format_version": FORMAT_VERSION}
    sweep_stale(path.parent, f".{glob.escape(path.name)}.*.tmp")  # only our own kind: the folder may be anyone's
    fd, tmp = locked_temp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)  # while the lock is held: a sweeper never sees an unowned temporary file
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        why = _write_failure(exc, path.parent)
        if why is not None:
            raise CheckpointError(f"Could not save checkpoint {path}: {why}; the previous checkpoint is intact.") from exc
        raise
    return given


def _write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why writing failed, for OSErrors and torch's writer errors (whose cause is an OSError); else None."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for error in chain:
        if isinstance(error, OSError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"the disk is full ({_free(folder)} free in {folder})"
            return error.strerror or str(error)
    if isinstance(chain[0], RuntimeError) and "unexpected pos" in str(chain[0]):  # torch's writer came up short
        return f"the file could not be written in full ({_free(folder)} free in {folder})"
    return None


def _free(folder: Path) -> str:
    try:
        return iec_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a ResLens checkpoint with ``weights_only=True``; any problem is a ``CheckpointError``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} is not a regular file (a folder, pipe or device).")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is an empty file.")
    _check_archive(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function reference
            raise CheckpointError(
                f"Checkpoint {path} was refused: it holds Python objects that would run code when loaded, "
                "and ResLens loads only plain weight files."
            ) from exc
        raise CheckpointError(f"Checkpoint {path} is not a readable PyTorch file (truncated or corrupt).") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError,
            TypeError, AttributeError) as exc:
        raise CheckpointError(f"Checkpoint {path} is not a readable PyTorch file (truncated or corrupt).") from exc
    return _validated(path, data)


def _check_archive(path: Path) -> None:
    """Read the zip directory before anything is unpacked: PyTorch stores records uncompressed, so a
    compressed record, or records adding up to more than the file holds, mean a forged file (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"Checkpoint {path} {_not_a_zip(path)}") from exc
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"Checkpoint {path} was refused: its record {packed[0]} is compressed, which PyTorch "
                              "never writes (the file may unpack to far more memory than its size).")
    if sum(r.file_size for r in records) > path.stat().st_size:
        raise CheckpointError(f"Checkpoint {path} was refused: its records claim more data than the file holds.")
    damaged = first_damaged_record(path, records)
    if damaged:
        raise CheckpointError(f"Checkpoint {path} is damaged: its record {damaged} does not match its checksum "
                              "(the file was changed on disk since it was written).")


LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch.save magic number


def _not_a_zip(path: Path) -> str:
    """Why a file that is no zip archive is not read, from its first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}."
    if head.startswith(LEGACY_MAGIC):
        return ("is in PyTorch's legacy format (torch.save before PyTorch 1.6, or with "
                "_use_new_zipfile_serialization=False), which ResLens does not read: load it with torch.load and save "
                "it again with torch.save to convert it.")
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "is a safetensors file, not a PyTorch checkpoint: give the .pt file ResLens wrote."
    return "is not a readable PyTorch file (truncated or corrupt, or another kind of file)."


def first_damaged_record(path: Path, records: list[zipfile.ZipInfo]) -> str | None:
    """The first stored record whose CRC-32 differs from the directory's, or None: ``ZipFile.testzip`` for
    uncompressed records, 1.6-2.4x faster (the checksum runs over the mapped file, without copies;
    bench/checkpoint_crc.py)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for record in records:
            if record.header_offset + 30 > len(mapped):  # its local header lies past the end
                return record.filename
            name_len, extra_len = struct.unpack_from("<HH", mapped, record.header_offset + 26)
            start = record.header_offset + 30 + name_len + extra_len  # after the record's local header
            with memoryview(mapped)[start : start + record.compress_size] as data:
                if zlib.crc32(data) != record.CRC:
                    return record.filename
    return None


def _validated(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not all(k in data for k in REQUIRED_KEYS):
        inner = data.get("state_dict", data) if isinstance(data, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            raise CheckpointError(
                f"{path} holds bare weights (a state_dict), not a ResLens checkpoint, which also records the "
                "architecture, classes and preprocessing: start from a checkpoint ResLens wrote, or from "
                "torchvision's ImageNet weights with init: imagenet.")
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise CheckpointError(f"{path} is not a ResLens checkpoint (missing: {', '.join(missing)}).")
    version = data["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {version}, newer than this ResLens reads ({FORMAT_VERSION}); "
            "update ResLens to open it."
        )
    why = _bad_value(data)
    if why:
        raise CheckpointError(f"Checkpoint {path} is damaged or was not written by ResLens: {why}.")
    if len(data["class_names"]) != data["num_classes"]:
        raise CheckpointError(f"Checkpoint {path} is inconsistent: {data['num_classes']} classes but "
                              f"{len(data['class_names'])} class names.")
    if not _ood_record_ok(data.get("ood")):
        data["ood"] = None  # thresholds that cannot be read are as good as none (`ood-thresholds` writes them anew)
    return data


def _bad_value(data: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's values (types and sane ranges), or None."""
    names, state = data["class_names"], data["model"]
    if not isinstance(data["num_classes"], int) or isinstance(data["num_classes"], bool):
        return f"num_classes is {data['num_classes']!r}, not a whole number"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "class_names is not a list of names"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "model is not a dictionary of weight tensors"
    return _bad_preprocessing(data["preprocessing"])


def _bad_preprocessing(pre: Any) -> str | None:
    if not isinstance(pre, dict) or not isinstance(pre.get("extra") or {}, dict):
        return "preprocessing is not a dictionary (with an optional dictionary 'extra')"
    size, resize = pre.get("image_size"), pre.get("resize")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, resize)):
        return f"preprocessing needs whole-number image_size and resize, got {size!r} and {resize!r}"
    if not (IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1] and size <= resize <= 2 * size):
        return (f"preprocessing image_size {size} / resize {resize} are out of range (image_size {IMAGE_SIZES[0]} "
                f"to {IMAGE_SIZES[1]} pixels, resize from image_size to twice it)")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_finite(v) for v in values)):
            return f"preprocessing {key} is {values!r}, not three numbers"
    if min(pre["std"]) <= 0:
        return f"preprocessing std {pre['std']!r} must be positive"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_list(values: Any) -> bool:
    return isinstance(values, list) and len(values) > 1 and all(_finite(v) for v in values)


def _ood_record_ok(record: Any) -> bool:
    """Whether an ``"ood"`` record (core.ood.calibrate) holds numbers where numbers belong; absent counts as ok."""
    if not record:
        return True
    return (isinstance(record, dict)
            and all(_finite(record.get(k)) for k in ("msp_threshold", "energy_threshold"))
            and all(_finite_list(record.get(k)) for k in ("msp_quantiles", "energy_quantiles")))


def checkpoint_info(path: str | os.PathLike[str], data: dict[str, Any] | None = None) -> CheckpointInfo:
    data = data if data is not None else load_checkpoint(path)
    return CheckpointInfo(
        path=Path(path), arch=data["arch"], class_names=list(data["class_names"]),
        preprocessing=Preprocessing.from_dict(data["preprocessing"]), epoch=data.get("epoch"),
        stage_name=data.get("stage_name"), run_name=data.get("run_name"), metrics=dict(data.get("metrics") or {}),
        ood=data.get("ood") or None, batches_done=_count(data.get("batches_done")),
    )


def _count(value: Any) -> int:
    """A stored count, or 0 when it is missing or not a positive whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def class_change(before: list[str], now: list[str]) -> str | None:
    """How a data set's classes changed between a checkpoint and now (``None``: the same, in the same order)."""
    if list(before) == list(now):
        return None
    added, removed = [c for c in now if c not in before], [c for c in before if c not in now]
    parts = [f"{len(before)} -> {len(now)} classes"]
    if added:
        parts.append(f"added {_few(added)}")
    if removed:
        parts.append(f"removed {_few(removed)}")
    if added and sorted(map(_nfc, added)) == sorted(map(_nfc, removed)):
        parts.append("the same names written in another Unicode form: folders copied between macOS and Linux?")
    if not (added or removed):
        parts.append("the same names in another order")
    return "; ".join(parts)


def _few(names: list[str]) -> str:
    """Up to five names, quoted when one holds a comma (``grand piano, upright`` is one class, not two)."""
    shown = [repr(n) for n in names[:5]] if any("," in n for n in names) else names[:5]
    return ", ".join(shown) + (" ..." if len(names) > 5 else "")


def check_compatible(info: CheckpointInfo, arch: str | None = None, class_names: list[str] | None = None) -> None:
    """Raise ``CheckpointError`` when the checkpoint's architecture or classes differ from what is expected."""
    if arch is not None and info.arch != arch:
        raise CheckpointError(f"Checkpoint {info.path} holds a {info.arch}, but a {arch} is expected.")
    changed = None if class_names is None else class_change(info.class_names, list(class_names))
    if changed:
        raise CheckpointError(f"Checkpoint {info.path} was trained on other classes than those expected here "
                              f"({changed}).")


def inference_weights(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's metrics were measured with: the weight average (EMA) that a stage's
    unfinished ``last.pt`` keeps for its resume, when there is one, else ``data["model"]``."""
    ema = (data.get("trainer_state") or {}).get("ema")
    if isinstance(ema, dict):
        average = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
        if average.keys() == data["model"].keys() and all(isinstance(v, torch.Tensor) for v in average.values()):
            return average
    return data["model"]


def load_weights(model: nn.Module, state: dict[str, Any], source: object) -> nn.Module:
    """``model.load_state_dict(state)``, with weights that do not fit reported as one sentence."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"The weights in {source} do not fit this model (the checkpoint is damaged or was written for "
            "another architecture or class count)."
        ) from exc
    return model


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
               arch: str | None = None, class_names: list[str] | None = None) -> tuple[nn.Module, CheckpointInfo]:
    """Build the checkpoint's model, load its weights and return it in eval mode with its info."""
    data = load_checkpoint(path)
    info = checkpoint_info(path, data)
    check_compatible(info, arch, class_names)
    weights = inference_weights(data)
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"Checkpoint {path} holds weights that are not numbers (NaN or infinite, first in "
                              f"{broken[0]}): the file is damaged.")
    model = build_model(info.arch, info.num_classes, "scratch")
    load_weights(model, weights, path)
    return model.to(device).eval(), info
