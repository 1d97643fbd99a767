"""Names and bundles of explanation files, shared by the CLI (`python -m train explain`) and the Explain page.

A map's file is named after everything that made it: ``<image>_<layer>_<method>_<class>.<ext>``
(``dog_layer2_gradcampp_tabby-cat.png``), so maps of other layers, methods or classes never overwrite each
other. ``bundle_zip`` packs the shown overlays (PNG), the maps themselves (``.npy``, float32 at the model's
input size, before any colour scaling) and the predictions (JSON and CSV).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PREDICTION_COLUMNS = ("image", "rank", "class", "index", "probability", "explained_class", "method", "layers", "ood")


MAX_PART_BYTES = 60  # four parts, their separators and the suffix stay under file systems' 255-byte names


def file_part(text: str) -> str:
    """``text`` made safe inside a file name: '++' -> 'pp', anything but letters (any script), digits, '.' and '-'
    -> '-'; a part longer than ``MAX_PART_BYTES`` is cut and ends in a short hash of the whole, so it stays unique."""
    cleaned = re.sub(r"(?:[^\w.\-]|_)+", "-", str(text).replace("++", "pp")).strip("-.") or "x"
    if len(cleaned.encode()) <= MAX_PART_BYTES:
        return cleaned
    digest = hashlib.sha256(cleaned.encode()).hexdigest()[:8]
    cut = cleaned.encode()[:MAX_PART_BYTES - 9].decode(errors="ignore")
    return f"{cut}-{digest}"


def map_name(image: str, layer: str, method: str, class_name: str, ext: str = "png") -> str:
    """``<image stem>_<layer>_<method>_<class>.<ext>``; ``image`` is already a stem (``unique_stems``)."""
    return "_".join(file_part(p) for p in (image, layer, method, class_name)) + f".{ext}"


def class_parts(class_names: Sequence[str]) -> dict[str, str]:
    """Each class's part of a file name (``file_part``), with a short hash of the name added where two classes of
    the model would share one ('a b' and 'a_b', 'C++' and 'Cpp'), so their maps never overwrite each other."""
    parts = [file_part(name) for name in class_names]
    counts = Counter(parts)
    return {name: f"{part}-{hashlib.sha256(name.encode()).hexdigest()[:6]}" if counts[part] > 1 else part
            for name, part in zip(class_names, parts)}


def unique_stems(names: Sequence[str], earlier: dict[str, str] | None = None) -> list[str]:
    """Each name's stem made safe for a file name (``file_part``), with ``-2``, ``-3``... added when two inputs
    share one (a/dog.jpg and b/dog.png; 'my dog.jpg' and 'my_dog.jpg'). ``earlier``: stems that earlier calls
    gave to images (stem -> image), taken unless it was the same image (so a second call never overwrites the
    maps of another image with the same file name: Caltech's image_0001.jpg, a phone's IMG_0001.JPG)."""
    earlier = earlier or {}
    taken: set[str] = set()
    stems = []
    for raw in names:
        stem = name = file_part(Path(raw).stem)
        n = 1
        while name in taken or earlier.get(name, raw) != raw:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        stems.append(name)
    return stems


def stems_in(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Stem -> image (its resolved ``path``, else the name it was given) of the maps that prediction records name
    (a map's name starts with its stem and '_', which no part of a name contains)."""
    return {name.split("_")[0]: record.get("path") or record["image"] for record in records
            if isinstance(record, dict) for name in (record.get("overlays") or {}).values() if isinstance(name, str)}


def prediction_record(image: str, probabilities: np.ndarray, class_names: Sequence[str], explained: int,
                      top_k: int = 5, **extra: Any) -> dict[str, Any]:
    """One image's top-k predictions and the class explained, JSON-ready; ``extra`` keys are added as they are."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return {
        "image": image,
        "explained_class": class_names[explained],
        "explained_index": int(explained),
        "predictions": [{"class": class_names[i], "index": int(i), "probability": round(float(probabilities[i]), 6)}
                        for i in order],
        **extra,
    }


def predictions_csv(records: Iterable[dict[str, Any]]) -> str:
    """One row per image and rank: image, rank, class, index, probability, explained class, the method and layers
    that explained it (space-separated), OOD verdict."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        verdict = (record.get("ood") or {}).get("level", "")
        for rank, p in enumerate(record["predictions"], start=1):
            writer.writerow({"image": _cell(record["image"]), "rank": rank, "class": _cell(p["class"]),
                             "index": p["index"], "probability": p["probability"],
                             "explained_class": _cell(record["explained_class"]), "method": record.get("method", ""),
                             "layers": " ".join(record.get("layers") or []), "ood": verdict})
    return out.getvalue()


def _cell(text: str) -> str:
    """Text that a spreadsheet would run as a formula ('=cmd|...': class names can come from anyone's zip) is
    written with a leading apostrophe, as OWASP advises for CSV exports."""
    return f"'{text}" if str(text)[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@dataclass(frozen=True)
class ShownMap:
    """One map as shown: what made it, the overlay PNG and the map's values [H, W] at the model's input size."""

    image: str
    layer: str
    method: str
    class_name: str
    png: bytes
    values: np.ndarray

    def name(self, ext: str) -> str:
        return map_name(self.image, self.layer, self.method, self.class_name, ext)


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def bundle_zip(maps: Sequence[ShownMap], records: Sequence[dict[str, Any]], about: dict[str, Any] | None = None) -> bytes:
    """A zip of every map (``maps/<name>.png`` and ``.npy``) plus ``predictions.json`` and ``predictions.csv``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for shown in maps:
            bundle.writestr(f"maps/{shown.name('png')}", shown.png)
            bundle.writestr(f"maps/{shown.name('npy')}", npy_bytes(shown.values))
        bundle.writestr("predictions.json", json.dumps({**(about or {}), "images": list(records)}, indent=2))
        bundle.writestr("predictions.csv", predictions_csv(records))
    return buffer.getvalue()
