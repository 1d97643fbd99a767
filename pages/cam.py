"""Cached model work shared by the Explain and Classes pages (not a page itself).

The network runs only when what it depends on changes: logits are cached per (checkpoint file version, image
bytes); maps per (checkpoint, image, layers, method, smoothing, target class). Maps are cached unnormalised
(their magnitude kept), so the colour scale, opacity and colormap only re-render the overlay.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from pages import common

# One model object serves every session (st.cache_resource); the engine hooks its modules while it runs,
# so two sessions must not run it at the same time.
MODEL_LOCK = threading.Lock()

METHODS = {"Grad-CAM": "gradcam", "Grad-CAM++": "gradcam++", "LayerCAM": "layercam",
           "Score-CAM (gradient-free, slow)": "scorecam", "Eigen-CAM (class-agnostic)": "eigencam",
           "Counterfactual (against the class)": "counterfactual"}
SMOOTHING = {"Test-time augmentation (flips, brightness)": "aug", "Eigen smoothing (first principal component)": "eigen"}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Picture:
    """An image to explain: its name, its bytes and their digest (``key``, hashed once: every cache's key)."""

    name: str
    data: bytes
    key: str

    @classmethod
    def of(cls, name: str, data: bytes) -> "Picture":
        return cls(name, data, digest(data))


@st.cache_data(show_spinner=False, max_entries=16)
def decode(key: str, _data: bytes, name: str) -> Image.Image:
    """The upright RGB image of an upload (``key`` is the bytes' digest); raises ``ImageError``."""
    from core.images import load_image

    return load_image(_data, name)


def image_of(picture: Picture) -> Image.Image:
    return decode(picture.key, picture.data, picture.name)


@st.cache_data(show_spinner=False, max_entries=256)
def source_png(source: str) -> bytes:
    """PNG bytes of the image a data set's ``source`` string names (misclassified samples)."""
    from core.samples import load_source, png_bytes

    return png_bytes(load_source(source))


def _input(checkpoint: Path, image: Image.Image):  # type: ignore[no-untyped-def]
    _, info = common.load_model(checkpoint)
    return info.preprocessing.eval_transform()(image).unsqueeze(0)


def logits(checkpoint: Path, picture: Picture) -> np.ndarray:
    """The model's logits for the image (cached)."""
    return _logits(common.file_version(checkpoint), picture.key, picture.data, picture.name)


def predict(checkpoint: Path, picture: Picture) -> np.ndarray:
    """Class probabilities of the image under the checkpoint's model (cached)."""
    values = logits(checkpoint, picture)
    exp = np.exp(values - values.max())
    return exp / exp.sum()


@st.cache_data(show_spinner="Running the model...", max_entries=128)
def _logits(version: tuple[str, int, int], key: str, _data: bytes, name: str) -> np.ndarray:
    import torch

    checkpoint = Path(version[0])
    model, _ = common.load_model(checkpoint)
    batch = _input(checkpoint, decode(key, _data, name))
    with MODEL_LOCK, torch.no_grad():
        out = model(batch)
    return out[0].double().numpy()


def ood_stats(checkpoint: Path) -> dict:
    """The checkpoint's out-of-distribution thresholds (core.ood), or {} when it has none."""
    return dict(common.load_model(checkpoint)[1].ood or {})


def maps(checkpoint: Path, picture: Picture, layers: tuple[str, ...], method: str, target: int,
         smoothing: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Unnormalised maps at the model's input size, one per layer, for class ``target`` (cached)."""
    return _maps(common.file_version(checkpoint), picture.key, picture.data, picture.name, layers, method, target,
                 smoothing)


@st.cache_data(show_spinner="Computing the maps...", max_entries=128)
def _maps(version: tuple[str, int, int], key: str, _data: bytes, name: str, layers: tuple[str, ...],
          method: str, target: int, smoothing: tuple[str, ...]) -> dict[str, np.ndarray]:
    from core.gradcam import explain

    checkpoint = Path(version[0])
    model, _ = common.load_model(checkpoint)
    batch = _input(checkpoint, decode(key, _data, name))
    with MODEL_LOCK:
        result = explain(model, batch, list(layers), targets=[target], methods=(method,), normalised=False,
                         aug_smooth="aug" in smoothing, eigen_smooth="eigen" in smoothing)
    return {layer: result.maps[layer][method][0, 0].numpy() for layer in layers}


MIN_SHOWN_SIDE = 320  # small images (64 px data sets) are enlarged so the colour bar stays legible


def overlay_png(checkpoint: Path, image: Image.Image, cam: np.ndarray, colormap: str, opacity: float,
                label: str = "importance") -> bytes:
    """The map (values in [0, 1]) over the original image (crop mapped back, aspect kept) as PNG bytes, with a
    colour bar."""
    from core.overlay import overlay

    _, info = common.load_model(checkpoint)
    factor = -(-MIN_SHOWN_SIDE // max(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)
    return overlay(image, cam, info.preprocessing, colormap=colormap, opacity=opacity, label=label)


def layer_choices(checkpoint: Path) -> list:  # list[LayerInfo]
    """Every layer the engine supports for this model, in forward order, with stage and map resolution."""
    return _layers(common.file_version(checkpoint))


@st.cache_data(show_spinner=False, max_entries=8)
def _layers(version: tuple[str, int, int]) -> list:
    from core.gradcam import supported_layers

    model, info = common.load_model(Path(version[0]))
    with MODEL_LOCK:
        return supported_layers(model, info.preprocessing.image_size)


def quick_overlay(checkpoint: Path, png: bytes, class_name: str) -> bytes:
    """Grad-CAM of ``class_name`` at the model's recommended layer over an image (the Classes gallery)."""
    from core.gradcam import recommended_layer

    layer = recommended_layer(layer_choices(checkpoint))
    _, info = common.load_model(checkpoint)
    picture = Picture.of("sample.png", png)
    target = info.class_names.index(class_name) if class_name in info.class_names else int(
        np.argmax(predict(checkpoint, picture)))
    from core.cam_scale import own_scale

    cam = maps(checkpoint, picture, (layer,), "gradcam", target)[layer]
    return overlay_png(checkpoint, image_of(picture), own_scale(cam), "jet", 0.5)
