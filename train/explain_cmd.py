"""`python -m train explain CHECKPOINT IMAGE... [--layer L]... [--method M] [--target [IMAGE=]C]... --out DIR`.

One forward pass per batch serves every ``--layer`` (default: the model's recommended layer). Each overlay is
named after its image, layer, method and class (``dog_layer2_gradcam_tabby.png``, see core/explain_files.py),
so later calls with other layers, methods or classes never overwrite earlier ones, nor do other images with the
same file name (``dog-2_...``: the stems earlier calls used are read from ``predictions.json``); ``predictions.json`` and
``predictions.csv`` gather the records of every call into the folder (a record is replaced only by one for
the same image, layers, method and class). ``--target`` names a class for every image, or for one image as
``IMAGE=CLASS``. An unreadable image is reported with the reason and the others are still written (exit
status 1 at the end if any failed); a checkpoint that cannot be loaded or a bad request stops the command
(status 2).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from core import ood
from core.cam_scale import SCALES, on_scale, scale_label, shared_scales
from core.errors import UserError
from core.explain_files import (class_parts, map_name, npy_bytes, predictions_csv, prediction_record, stems_in,
                                unique_stems)
from core.gradcam import ALL_METHODS, explain, recommended_layer, supported_layers
from core.images import ImageError, load_image
from core.overlay import COLORMAPS, overlay
from train.cli import at_least, folder, say

BATCH = 8


class ExplainError(UserError, ValueError):
    """An explain request that cannot be carried out, in one sentence."""


@dataclass
class Picture:
    """A readable input: where it came from, the decoded original, its file stem and what was found."""

    path: Path
    image: Any  # PIL.Image.Image
    stem: str
    target: int | None = None
    logits: np.ndarray | None = None
    explained: int = 0
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> unnormalised map at input size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a ResLens checkpoint (.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain")
    parser.add_argument("--layer", action="append", default=None, metavar="LAYER",
                        help="layer to explain, as named_modules() spells it; repeat for several (one pass). "
                             "Default: the recommended layer (the deepest stage with a map of at least 6x6)")
    parser.add_argument("--target", action="append", default=[], metavar="[IMAGE=]CLASS",
                        help="class to explain, by name or index, for every image or as IMAGE=CLASS for one; "
                             "repeatable (default: each image's top-1 class)")
    parser.add_argument("--method", default="gradcam", choices=ALL_METHODS, help="map to draw (default: gradcam)")
    parser.add_argument("--aug-smooth", action="store_true",
                        help="average the map over flips and brightness changes (test-time augmentation)")
    parser.add_argument("--eigen-smooth", action="store_true",
                        help="first principal component of the weighted channels instead of their sum")
    parser.add_argument("--scale", choices=tuple(SCALES), default="own",
                        help="own: each map stretched to 0-1; shared: one scale per layer over all images")
    parser.add_argument("--npy", action="store_true", help="also save each map as .npy (float32, input size)")
    parser.add_argument("--out", required=True, type=folder,
                        help="folder to write the overlays and predictions into")
    parser.add_argument("--top-k", type=at_least(1), default=5, help="predictions to print per image (default: 5)")
    parser.add_argument("--colormap", default="jet", choices=list(COLORMAPS), help="colormap (default: jet)")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1] (default: 0.5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device to run the model on (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Write class-activation overlays and predictions for images under a checkpoint's model."""
    from core.checkpoints import load_model
    from train.distributed import pick_device

    if not 0 <= args.opacity <= 1:
        raise ExplainError(f"--opacity must be between 0 and 1, not {args.opacity}.")
    model, info = load_model(args.checkpoint, device=pick_device(args.device))
    layers = check_layers(model, info.preprocessing.image_size, args.layer)
    pictures, failures = _read_images(args.images)
    assign_targets(pictures, args.target, info.class_names, args.images)
    out = _output_folder(args.out)
    with _only_writer(out):
        records = _explain_into(out, model, info, pictures, layers, failures, args)
    say(f"wrote {len(records) * len(layers)} overlay(s) and the predictions to {out}")
    if failures:
        print(f"{len(failures)} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


@contextmanager
def _only_writer(out: Path) -> Iterator[None]:
    """One call at a time writes into ``out`` (its map names and the predictions files it merges into); another
    waits for it, and says so."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another explain that writes into {out}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _explain_into(out: Path, model: torch.nn.Module, info: Any, pictures: list[Picture], layers: list[str],
                  failures: list[dict[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every picture's maps and overlays into ``out``, merged into its predictions files; returns the records."""
    earlier = _earlier_predictions(out)  # before anything is written: a folder holding someone else's file is refused
    taken = stems_in(earlier.get("images", []))
    for picture, stem in zip(pictures, unique_stems([str(p.path.resolve()) for p in pictures], taken)):
        picture.stem = stem
    top_k = min(max(1, args.top_k), len(info.class_names))
    records = []
    for start in range(0, len(pictures), BATCH):
        batch = pictures[start : start + BATCH]
        _explain_batch(model, info, batch, layers, args)
        if args.scale != "shared":  # written now: only a shared scale needs every map first
            records += [_write(p, layers, {}, info.ood, info, top_k, args, out) for p in batch]
            for p in batch:
                p.maps = {}
    if args.scale == "shared":
        scales = shared_scales((layer, p.maps[layer]) for p in pictures for layer in layers)
        records = [_write(p, layers, scales, info.ood, info, top_k, args, out) for p in pictures]
    _merge_predictions(out, earlier, records, failures)
    return records


def check_layers(model: torch.nn.Module, image_size: int, asked: list[str] | None) -> list[str]:
    """The layers asked for (default: the recommended one), each checked against the model's layers."""
    valid = supported_layers(model, image_size)
    names = [info.name for info in valid]
    if not asked:
        return [recommended_layer(valid)]
    modules = dict(model.named_modules())
    for layer in asked:
        if layer not in names:
            why = (f"Layer '{layer}' has no single spatial map at {image_size} px (it is 1x1, not a feature map, or "
                   "runs more than once)" if layer in modules and layer else f"The model has no layer '{layer}'")
            raise ExplainError(f"{why}; valid layers: {', '.join(names)}.")
    return list(dict.fromkeys(asked))


def parse_target(target: str | None, class_names: list[str]) -> int | None:
    """A class given by name (exact, then case-insensitive) or by index; None means each image's top-1."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    folded = [name.casefold() for name in class_names]
    if target.casefold() in folded:
        return folded.index(target.casefold())
    if target.lstrip("-").isdecimal():  # not isdigit(): '²' is a digit to it, and no number to int()
        index = int(target)
        if 0 <= index < len(class_names):
            return index
        raise ExplainError(f"Class index {index} is out of range: the model has {len(class_names)} classes (0 to "
                           f"{len(class_names) - 1}).")
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    raise ExplainError(f"The model has no class named '{target}'; its classes are: {shown}.")


def assign_targets(pictures: list[Picture], targets: list[str], class_names: list[str], inputs: list[str]) -> None:
    """``--target CLASS`` for every image, ``--target IMAGE=CLASS`` (path as given, or file name) for one."""
    for value in targets:
        image, sep, name = value.rpartition("=")
        unknown = image if sep and not any(image in (raw, Path(raw).name) for raw in inputs) else None
        if unknown is not None or not sep:
            image, name = "", value  # a class for every image (its name may hold '=')
        try:
            index = parse_target(name, class_names)
        except ExplainError:
            if unknown is None:
                raise
            raise ExplainError(f"--target {value}: {unknown} is not one of the images given, and the model has no "
                               f"class named {value!r}.") from None
        for picture in pictures:
            if not image or image in (str(picture.path), picture.path.name):
                picture.target = index


def _output_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ExplainError(f"--out {out} is a file; name a folder for the overlays and predictions.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExplainError(f"Cannot create the output folder {out}: {exc.strerror or exc}.") from exc
    return out


def _read_images(paths: list[str]) -> tuple[list[Picture], list[dict[str, str]]]:
    """Decode every input; the unreadable ones are reported (on stderr and in the result) and skipped."""
    pictures: list[Picture] = []
    failures: list[dict[str, str]] = []
    for raw in paths:
        try:
            pictures.append(Picture(Path(raw), load_image(Path(raw)), ""))
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures.append({"image": raw, "error": str(exc)})
    return pictures, failures


def _explain_batch(model: torch.nn.Module, info: Any, pictures: list[Picture], layers: list[str],
                   args: argparse.Namespace) -> None:
    """Logits, explained classes and unnormalised maps of every layer for a batch, from one forward pass."""
    transform = info.preprocessing.eval_transform()
    device = next(model.parameters()).device
    batch = torch.stack([transform(p.image) for p in pictures]).to(device)
    asked = [p.target for p in pictures]
    if None in asked and any(t is not None for t in asked):  # a mix: the top-1 classes first
        with torch.no_grad():
            top1 = model.eval()(batch).argmax(dim=1).tolist()
        asked = [t if t is not None else top1[i] for i, t in enumerate(asked)]
    result = explain(model, batch, layers, None if None in asked else asked, methods=args.method,
                     aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth, normalised=False)
    targets = result.targets[:, 0].tolist()
    logits = result.logits.float().cpu().numpy()
    maps = {layer: result.maps[layer][args.method][:, 0].float().cpu().numpy() for layer in layers}
    for i, picture in enumerate(pictures):
        picture.logits, picture.explained = logits[i], targets[i]
        picture.maps = {layer: maps[layer][i] for layer in layers}


def _write(picture: Picture, layers: list[str], scales: dict[Any, float], stats: dict[str, Any] | None, info: Any,
           top_k: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The overlays (and .npy maps) of one image, and its prediction record."""
    class_name = info.class_names[picture.explained]
    part = class_parts(info.class_names)[class_name]
    signed = args.method == "raw"
    files = {}
    for layer in layers:
        values, scale = picture.maps[layer], scales.get(layer)
        shown = values if signed else on_scale(values, scale)
        png = overlay(picture.image, shown, info.preprocessing, colormap=args.colormap, opacity=args.opacity,
                      signed=signed, scale=scale, label=f"{args.method} ({scale_label(scale)})")
        files[layer] = map_name(picture.stem, layer, args.method, part)
        (out / files[layer]).write_bytes(png)
        if args.npy:
            (out / map_name(picture.stem, layer, args.method, part, "npy")).write_bytes(npy_bytes(values))
    verdict = ood.assess(picture.logits, stats)
    probabilities = np.exp(picture.logits - picture.logits.max())
    record = prediction_record(
        str(picture.path), probabilities / probabilities.sum(), info.class_names, picture.explained, top_k,
        path=str(picture.path.resolve()), size=list(picture.image.size), method=args.method, layers=layers,
        overlays=files,
        smoothing=[s for s, on in (("aug", args.aug_smooth), ("eigen", args.eigen_smooth)) if on],
        scale=args.scale, ood=verdict.record())
    ranked = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in record["predictions"])
    say(f"{record['image']}: {ranked} -> {', '.join(files.values())} (explaining {class_name})")
    if verdict.level in ("out", "borderline"):
        say(f"  {verdict.sentence}")
    return record


def _earlier_predictions(out: Path) -> dict[str, Any]:
    """What earlier calls left in ``out/predictions.json`` ({} when none); ``ExplainError`` when the file there is
    not one ResLens wrote (it is left alone)."""
    path = out / "predictions.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        earlier = exc
    if not isinstance(earlier, dict) or not isinstance(earlier.get("images"), list):
        raise ExplainError(f"{path} exists and is not a predictions file of `python -m train explain`; it is left "
                           "as it is: choose another --out folder, or move the file away.")
    return earlier


def _merge_predictions(out: Path, earlier: dict[str, Any], records: list[dict[str, Any]],
                       failures: list[dict[str, str]]) -> None:
    """Add this call's records to ``predictions.json`` (same image, layers, method and class replaced) and
    rewrite ``predictions.csv`` from them; each file replaced whole (a killed call leaves the previous one)."""
    key = lambda r: (r.get("path") or r.get("image"), tuple(r.get("layers") or ()), r.get("method"),  # noqa: E731
                     r.get("explained_class"))
    merged = {key(r): r for r in earlier.get("images", []) if isinstance(r, dict)}
    claimed = {name for r in records for name in r["overlays"].values()}
    for k, old in list(merged.items()):  # a map this call rewrote is this call's now, not an earlier record's
        overlays = old.get("overlays") or {}
        kept = {layer: name for layer, name in overlays.items() if name not in claimed}
        if kept == overlays:
            continue
        if kept:
            layers = [layer for layer in old.get("layers") or [] if layer in kept]
            merged[k] = {**old, "overlays": kept, "layers": layers}
        else:
            del merged[k]
    merged.update({key(r): r for r in records})
    failed = {f["image"]: f for f in earlier.get("failed", []) if isinstance(f, dict)}
    failed.update({f["image"]: f for f in failures})
    for record in records:
        failed.pop(record["image"], None)
    _replace_text(out / "predictions.json",
                  json.dumps({"images": list(merged.values()), "failed": list(failed.values())}, indent=2))
    _replace_text(out / "predictions.csv", predictions_csv(merged.values()))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


COMMANDS = {"explain": (add_arguments, run)}
