"""`python -m train export-model CHECKPOINT --format torchscript|onnx|safetensors --out DIR`: take a model away.

Writes into DIR the model in eval mode (``model.pt`` TorchScript, ``model.onnx`` or ``model.safetensors``),
``model.json`` (architecture, class names, preprocessing: input size, resize, mean, std; and the
out-of-distribution thresholds when the checkpoint has them) and ``predict.py``, a small example that needs only
torch/torchvision (TorchScript), torchvision + safetensors (safetensors) or onnxruntime + Pillow + numpy (ONNX).
ONNX and safetensors need their optional packages (requirements-dev.txt); without them the command says so.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from core import images
from core.errors import UserError
from train.cli import folder

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
TEMPLATES = Path(__file__).resolve().parent / "export_templates"
NEEDS = {"onnx": ("onnx", "onnxscript"), "safetensors": ("safetensors",)}


class ExportError(UserError, ValueError):
    """A model that cannot be exported as asked, in one sentence."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a ResLens checkpoint (.pt)")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="what to export to")
    parser.add_argument("--out", required=True, type=folder,
                        help="folder to write the model, model.json and predict.py into")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace those files when the folder already holds them (an earlier export)")


def _check_packages(fmt: str) -> None:
    import importlib.util

    missing = [name for name in NEEDS.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"Exporting to {fmt} needs the Python package(s) {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}.")


def model_description(info: Any, fmt: str) -> dict[str, Any]:
    """What model.json says: how to feed the model and how to read its output."""
    pre = info.preprocessing
    return {
        "format": fmt, "file": FORMATS[fmt], "arch": info.arch, "num_classes": info.num_classes,
        "class_names": info.class_names,
        "preprocessing": {"resize": pre.resize, "image_size": pre.image_size, "mean": list(pre.mean),
                          "std": list(pre.std), "steps": ["RGB (EXIF orientation applied, transparency over grey 128)", f"resize short side to {pre.resize} (bilinear)",
                                                          f"centre-crop {pre.image_size}", "scale to [0, 1]",
                                                          "normalise (x - mean) / std"]},
        "input": {"name": "input", "shape": ["batch", 3, pre.image_size, pre.image_size], "dtype": "float32",
                  "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", info.num_classes], "softmax": "not applied"},
        "source": {"checkpoint": str(info.path), "run": info.run_name, "stage": info.stage_name,
                   "epoch": info.epoch, "batches_done_in_epoch": info.batches_done, "metrics": info.metrics},
        "ood": info.ood,
    }


def export_model(checkpoint: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str],
                 overwrite: bool = False) -> dict[str, Any]:
    """Export the checkpoint's model as ``fmt`` into ``out``, all three files or none (files already there are
    replaced only with ``overwrite``); returns what model.json says of it."""
    from core.checkpoints import load_model

    if fmt not in FORMATS:
        raise ExportError(f"Unknown format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    _check_packages(fmt)
    model, info = load_model(checkpoint)
    folder = Path(out)
    if folder.is_file():
        raise ExportError(f"The output folder {folder} is a file; name a folder (it is made when missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"Cannot create the output folder {folder}: {exc.strerror or exc}.") from exc
    names = (FORMATS[fmt], "model.json", "predict.py")
    _check_targets(folder, names, overwrite)
    example = torch.zeros(1, 3, info.preprocessing.image_size, info.preprocessing.image_size)
    description = model_description(info, fmt)
    try:  # written beside, then moved in: a failure leaves the folder as it was
        staging = tempfile.TemporaryDirectory(dir=folder, prefix=".reslens-export-")
    except OSError as exc:
        raise ExportError(f"Cannot write in the output folder {folder}: {exc.strerror or exc}.") from exc
    with staging as tmp:
        staged = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice, the ONNX exporter's chatter
            _write(model.eval(), example, fmt, staged / names[0])
        (staged / "model.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
        (staged / names[0]).chmod((staged / "model.json").stat().st_mode & 0o777)  # safetensors writes 0600
        (staged / "predict.py").write_text(predict_script(fmt), encoding="utf-8")
        for name in names:
            os.replace(staged / name, folder / name)
    return description


def predict_script(fmt: str) -> str:
    """The exported predict.py: the format's template with the image reading (``image_reading``) put in."""
    template = (TEMPLATES / f"predict_{'onnx' if fmt == 'onnx' else 'torch'}.py").read_text()
    marker = ("# image_input.py (open_rgb, readable, image_arguments) is inserted here by "
              "`python -m train export-model`\n")
    return template.replace(marker, image_reading())


def image_reading() -> str:
    """predict.py's image reading: ResLens's own (``core.images._draft``, ``oriented_rgb`` and what it calls, by
    their source) and image_input.py (open_rgb, readable, image_arguments); it needs Image, ImageOps, numpy as np
    and sys."""
    reading = [f"MAX_SIDE = {images.MAX_SIDE!r}\nBACKGROUND = {images.BACKGROUND!r}\n"]
    reading += [inspect.getsource(f) for f in (images._draft, images.oriented_rgb, images.to_rgb, images._to_8bit)]
    reading.append((TEMPLATES / "image_input.py").read_text())
    return "\n\n".join(reading)


def _check_targets(folder: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse, in one sentence and before anything is written, a file to write that is a folder, or files already
    there without ``overwrite`` (a user's own model.json or predict.py is not replaced unasked)."""
    for name in names:
        if (folder / name).is_dir():
            raise ExportError(f"Cannot write {folder / name}: it is a folder.")
    there = [name for name in names if os.path.lexists(folder / name)]
    if there and not overwrite:
        raise ExportError(f"The output folder {folder} already holds {', '.join(there)}: choose another folder, "
                          "or pass --overwrite to replace them (an earlier export).")


def _write(model: torch.nn.Module, example: torch.Tensor, fmt: str, target: Path) -> None:
    if fmt == "torchscript":
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(model, example), str(target))
    elif fmt == "onnx":
        torch.onnx.export(model, (example,), str(target), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                          external_data=False, verbose=False)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))


def export_zip(checkpoint: str | os.PathLike[str], fmt: str) -> bytes:
    """The exported folder as zip bytes (the app's download button)."""
    with tempfile.TemporaryDirectory(prefix="reslens-export-") as tmp:
        export_model(checkpoint, fmt, tmp)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for path in sorted(Path(tmp).iterdir()):
                bundle.write(path, path.name)
        return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    """Export a checkpoint's model (TorchScript, ONNX or safetensors) with model.json and predict.py."""
    about = export_model(args.checkpoint, args.format, args.out, args.overwrite)
    folder = Path(args.out)
    print(f"wrote {folder / about['file']}, model.json and predict.py to {folder} "
          f"(try: python {folder / 'predict.py'} IMAGE)")
    source = about["source"]
    if source["batches_done_in_epoch"]:
        best = Path(args.checkpoint).with_name("best.pt")
        print(f"Note: {Path(args.checkpoint).name} was saved in the middle of epoch {source['epoch'] + 1} (after "
              f"{source['batches_done_in_epoch']} batches), when its run was stopped; its weights are partly "
              "trained. " + (f"{best} holds the stage's best validated model." if best.is_file() else
                             "The stage has no validated model (best.pt) yet."))
    return 0


COMMANDS = {"export-model": (add_arguments, run)}
