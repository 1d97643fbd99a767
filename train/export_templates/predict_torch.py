"""Classify images with the exported model: TorchScript (needs only torch, torchvision and Pillow) or
safetensors weights (torchvision's architecture named in model.json, plus the safetensors package).

    python predict.py IMAGE [IMAGE...]
"""
import json
import sys
import warnings
from pathlib import Path

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


def open_rgb(path: str) -> Image.Image:
    """The image as ResLens reads it: turned by its EXIF orientation, transparency laid over grey (128)."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (128, 128, 128, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def main(paths: list[str]) -> int:
    about = json.loads((HERE / "model.json").read_text())
    pre = about["preprocessing"]
    prepare = transforms.Compose([
        transforms.Resize(pre["resize"], antialias=True), transforms.CenterCrop(pre["image_size"]),
        transforms.ToTensor(), transforms.Normalize(pre["mean"], pre["std"]),
    ])
    model = load(about).eval()
    failed = 0
    for path in paths:
        try:
            image = open_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # one bad file: say so, go on
            print(f"{path}: cannot be read as an image ({exc})", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            logits = model(prepare(image).unsqueeze(0))[0]
        probabilities = logits.softmax(dim=0)
        top = probabilities.topk(min(5, len(probabilities)))
        ranked = ", ".join(f"{about['class_names'][i]} {p:.1%}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {ranked}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
