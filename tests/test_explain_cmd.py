"""`python -m train explain`: overlays per readable image, predictions, clear failures."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoints import save_checkpoint
from core.models import Preprocessing, build_model
from train.cli import main

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), "scratch")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {
        "arch": "resnet18", "num_classes": len(CLASSES), "class_names": CLASSES,
        "preprocessing": Preprocessing.for_size(32).to_dict(), "model": model.state_dict(),
    })
    return path


def _write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    broken = folder / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG at all")
    return {
        "dog": _write_image(folder / "dog.jpg", 60, 40, 1),
        "cat": _write_image(folder / "cat.png", 30, 50, 2),
        "broken": broken,
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_writes_one_overlay_per_readable_image_and_reports_the_broken_one(checkpoint, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["explain", str(checkpoint), str(inputs["dog"]), str(inputs["broken"]), str(inputs["cat"]),
                   "--layer", "layer4", "--out", str(out), "--top-k", "2"])
    assert status == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["cat_layer4.png", "dog_layer4.png", "predictions.json"]
    width, height = _png_size(out / "dog_layer4.png")
    assert width == 60 and height > 40  # original resolution, colour bar below
    assert _png_size(out / "cat_layer4.png")[0] == 30
    report = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in report["images"]] == ["dog.jpg", "cat.png"]
    assert report["failed"][0]["image"].endswith("broken.jpg") and report["failed"][0]["error"]
    for record in report["images"]:
        probabilities = [p["probability"] for p in record["predictions"]]
        assert len(probabilities) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert record["explained_class"] == record["predictions"][0]["class"]  # default: the top-1 class
        assert record["predictions"][0]["class"] in captured.out


def test_all_readable_gives_status_zero_and_target_by_name_or_index_is_the_same(checkpoint, inputs, tmp_path):
    by_name, by_index = tmp_path / "a", tmp_path / "b"
    common = [str(checkpoint), str(inputs["dog"]), "--layer", "layer3.1.bn2", "--method", "gradcam++"]
    assert main(["explain", *common, "--target", "Triangle", "--out", str(by_name)]) == 0
    assert main(["explain", *common, "--target", "2", "--out", str(by_index)]) == 0
    name = "dog_layer3.1.bn2_gradcampp.png"
    assert (by_name / name).read_bytes() == (by_index / name).read_bytes()
    record = json.loads((by_name / "predictions.json").read_text())["images"][0]
    assert (record["explained_class"], record["explained_index"]) == ("triangle", 2)


def test_same_stem_twice_gets_two_files(checkpoint, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    twin = _write_image(other / "dog.png", 20, 20, 3)
    out = tmp_path / "out"
    assert main(["explain", str(checkpoint), str(inputs["dog"]), str(twin), "--out", str(out)]) == 0
    assert (out / "dog_layer4.png").exists() and (out / "dog-2_layer4.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "hexagon"], "no class named 'hexagon'"),
        (["--target", "7"], "out of range"),
        (["--layer", "layer9"], "no layer named 'layer9'"),
        pytest.param(["--device", "cuda"], "sees no CUDA GPU", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has a GPU")),
    ],
)
def test_bad_requests_stop_with_one_sentence(checkpoint, inputs, tmp_path, capsys, extra, message):
    status = main(["explain", str(checkpoint), str(inputs["dog"]), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_unloadable_checkpoint_stops_with_a_clear_sentence(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.pt"):
        status = main(["explain", str(path), str(inputs["dog"]), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert status != 0 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
