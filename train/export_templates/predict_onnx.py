"""Classify images with the exported ONNX model (needs only onnxruntime, numpy and Pillow; no torch).

    python predict.py IMAGE [IMAGE...]
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent


def prepare(image: Image.Image, pre: dict) -> np.ndarray:
    """Resize the short side (bilinear), centre-crop, scale to [0, 1], normalise: as torchvision does."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(pre["resize"] * long / short)
    size = (pre["resize"], new_long) if width <= height else (new_long, pre["resize"])
    image = image.resize(size, Image.BILINEAR)
    side = pre["image_size"]
    left, top = int(round((image.width - side) / 2.0)), int(round((image.height - side) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    pixels = (pixels - np.array(pre["mean"], dtype=np.float32)) / np.array(pre["std"], dtype=np.float32)
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


# image_input.py (open_rgb, readable, image_arguments) is inserted here by `python -m train export-model`


def main(paths: list[str]) -> int:
    about = json.loads((HERE / "model.json").read_text())
    session = onnxruntime.InferenceSession(str(HERE / about["file"]), providers=["CPUExecutionProvider"])
    images, failed = readable(paths)
    for path, image in images:
        logits = session.run(None, {"input": prepare(image, about["preprocessing"])})[0][0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        ranked = ", ".join(f"{about['class_names'][i]} {probabilities[i]:.1%}" for i in np.argsort(-probabilities)[:5])
        print(f"{path}: {ranked}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(image_arguments(sys.argv[1:])))
