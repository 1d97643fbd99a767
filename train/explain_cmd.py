"""`python -m train explain CHECKPOINT IMAGE... --layer L [--target C] [--method M] --out DIR [--top-k 5]`.

Writes one overlay PNG per readable image, named after it (``dog.jpg`` -> ``dog_layer4.png``; other methods add
their name: ``dog_layer4_layercam.png``), prints the top-k predictions and writes them to
``DIR/predictions.json``. An unreadable image is reported with the reason and the others are still written
(exit status 1 at the end if any failed); a checkpoint that cannot be loaded stops the command (status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.gradcam import METHODS, explain
from core.images import ImageError, load_image
from core.overlay import COLORMAPS, overlay

BATCH = 8


class ExplainError(UserError, ValueError):
    """An explain request that cannot be carried out, in one sentence."""


@dataclass
class Picture:
    """A readable input: where it came from, the decoded original and the PNG name it gets."""

    path: Path
    image: Any  # PIL.Image.Image
    stem: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a ResLens checkpoint (.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain")
    parser.add_argument("--layer", default="layer4",
                        help="layer to explain, as named_modules() spells it (default: layer4)")
    parser.add_argument("--target", default=None,
                        help="class to explain, by index or name (default: each image's top-1 class)")
    parser.add_argument("--method", default="gradcam", choices=METHODS, help="map to draw (default: gradcam)")
    parser.add_argument("--out", required=True, help="folder to write the overlays and predictions.json into")
    parser.add_argument("--top-k", type=int, default=5, help="predictions to print per image (default: 5)")
    parser.add_argument("--colormap", default="jet", choices=list(COLORMAPS), help="colormap (default: jet)")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1] (default: 0.5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device to run the model on (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Write Grad-CAM overlays and predictions for images under a checkpoint's model."""
    from core.checkpoints import load_model

    if not 0 <= args.opacity <= 1:
        raise ExplainError(f"--opacity must be between 0 and 1, not {args.opacity}.")
    from train.distributed import pick_device

    model, info = load_model(args.checkpoint, device=pick_device(args.device))
    target = parse_target(args.target, info.class_names)
    top_k = min(max(1, args.top_k), len(info.class_names))
    out = _output_folder(args.out)
    pictures, failures = _read_images(args.images)
    records = []
    for start in range(0, len(pictures), BATCH):
        records += _explain_batch(model, info, pictures[start : start + BATCH], target, top_k, args, out)
    report = {"checkpoint": str(args.checkpoint), "layer": args.layer, "method": args.method,
              "images": records, "failed": failures}
    (out / "predictions.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {len(records)} overlay(s) and predictions.json to {out}")
    if failures:
        print(f"{len(failures)} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


def parse_target(target: str | None, class_names: list[str]) -> int | None:
    """A class given by name (exact, then case-insensitive) or by index; None means each image's top-1."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    folded = [name.casefold() for name in class_names]
    if target.casefold() in folded:
        return folded.index(target.casefold())
    if target.lstrip("-").isdigit():
        index = int(target)
        if 0 <= index < len(class_names):
            return index
        raise ExplainError(f"Class index {index} is out of range: the model has {len(class_names)} classes (0 to "
                           f"{len(class_names) - 1}).")
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    raise ExplainError(f"The model has no class named '{target}'; its classes are: {shown}.")


def _output_folder(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExplainError(f"Cannot create the output folder {out}: {exc.strerror or exc}.") from exc
    return out


def _read_images(paths: list[str]) -> tuple[list[Picture], list[dict[str, str]]]:
    """Decode every input; the unreadable ones are reported (on stderr and in the result) and skipped."""
    pictures: list[Picture] = []
    failures: list[dict[str, str]] = []
    stems: set[str] = set()
    for raw in paths:
        path = Path(raw)
        try:
            image = load_image(path)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures.append({"image": raw, "error": str(exc)})
            continue
        pictures.append(Picture(path, image, _unique(path.stem, stems)))
    return pictures, failures


def _unique(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when two inputs share a name (a/dog.jpg and b/dog.png)."""
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def _explain_batch(model: torch.nn.Module, info: Any, pictures: list[Picture], target: int | None, top_k: int,
                   args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    transform = info.preprocessing.eval_transform()
    device = next(model.parameters()).device
    batch = torch.stack([transform(p.image) for p in pictures]).to(device)
    targets = None if target is None else [target] * len(pictures)
    result = explain(model, batch, args.layer, targets, methods=args.method)
    probabilities = result.probabilities.cpu()
    maps = result.maps[args.layer][args.method][:, 0].cpu().numpy()
    records = []
    for i, picture in enumerate(pictures):
        name = _png_name(picture.stem, args.layer, args.method)
        png = overlay(picture.image, maps[i], info.preprocessing, colormap=args.colormap, opacity=args.opacity,
                      signed=args.method == "raw")
        (out / name).write_bytes(png)
        record = _record(picture, name, probabilities[i], int(result.targets[i, 0]), info.class_names, top_k)
        _print_record(record)
        records.append(record)
    return records


def _png_name(stem: str, layer: str, method: str) -> str:
    suffix = "" if method == "gradcam" else f"_{method.replace('++', 'pp')}"
    return f"{stem}_{layer}{suffix}.png"


def _record(picture: Picture, png: str, probabilities: torch.Tensor, explained: int, class_names: list[str],
            top_k: int) -> dict[str, Any]:
    top = probabilities.topk(top_k)
    return {
        "image": str(picture.path),
        "overlay": png,
        "size": list(picture.image.size),
        "explained_class": class_names[explained],
        "explained_index": explained,
        "predictions": [{"class": class_names[int(c)], "index": int(c), "probability": round(float(p), 6)}
                        for p, c in zip(top.values, top.indices)],
    }


def _print_record(record: dict[str, Any]) -> None:
    ranked = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in record["predictions"])
    print(f"{record['image']}: {ranked} -> {record['overlay']} (explaining {record['explained_class']})")


COMMANDS = {"explain": (add_arguments, run)}
