"""Classify images with the exported model: TorchScript (needs only torch, torchvision and Pillow) or
safetensors weights (torchvision's architecture named in model.json, plus the safetensors package).

    python predict.py IMAGE [IMAGE...]
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision import transforms

HERE = Path(__file__).resolve().parent


def load(about: dict) -> torch.nn.Module:
    if about["format"] == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # newer torch deprecates TorchScript; it still loads
            return torch.jit.load(str(HERE / about["file"]))
    from safetensors.torch import load_file

    model = getattr(torchvision.models, about["arch"])(weights=None, num_classes=about["num_classes"])
    model.load_state_dict(load_file(str(HERE / about["file"])))
    return model


# image_input.py (open_rgb, readable, image_arguments) is inserted here by `python -m train export-model`


def main(paths: list[str]) -> int:
    about = json.loads((HERE / "model.json").read_text())
    pre = about["preprocessing"]
    prepare = transforms.Compose([
        transforms.Resize(pre["resize"], antialias=True), transforms.CenterCrop(pre["image_size"]),
        transforms.ToTensor(), transforms.Normalize(pre["mean"], pre["std"]),
    ])
    model = load(about).eval()
    images, failed = readable(paths)
    for path, image in images:
        with torch.no_grad():
            logits = model(prepare(image).unsqueeze(0))[0]
        probabilities = logits.softmax(dim=0)
        top = probabilities.topk(min(5, len(probabilities)))
        ranked = ", ".join(f"{about['class_names'][i]} {p:.1%}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {ranked}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(image_arguments(sys.argv[1:])))
