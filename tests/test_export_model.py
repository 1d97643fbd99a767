"""`python -m train export-model`: each format's logits match the checkpoint's to 1e-4 on the same images,
model.json carries the preprocessing and class names, predict.py runs on its own (subprocess)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoints import load_model
from tests import app_fixtures as fx
from train.cli import main

HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX_EXPORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return fx.make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def batch(checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """Three real images through the checkpoint's preprocessing, and the checkpoint model's logits."""
    from PIL import Image
    import io

    model, info = load_model(checkpoint)
    transform = info.preprocessing.eval_transform()
    images = torch.stack([transform(Image.open(io.BytesIO(fx.png_bytes(s, c))).convert("RGB"))
                          for s, c in ((80, (200, 30, 30)), (50, (20, 200, 40)), (120, (10, 10, 220)))])
    with torch.no_grad():
        return images, model(images)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """export-model's folder for a format, exported once per module (ONNX's export alone takes seconds); tests read
    it and write their inputs elsewhere."""
    folders: dict[str, Path] = {}

    def folder(fmt: str) -> Path:
        if fmt not in folders:
            out = tmp_path_factory.mktemp(f"export-{fmt}") / "export"
            assert main(["export-model", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
            folders[fmt] = out
        return folders[fmt]

    return folder


def _logits(fmt: str, folder: Path, images: torch.Tensor) -> torch.Tensor:
    about = json.loads((folder / "model.json").read_text())
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(folder / about["file"]))(images)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / about["file"]), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    import torchvision
    from safetensors.torch import load_file

    model = getattr(torchvision.models, about["arch"])(weights=None, num_classes=about["num_classes"])
    model.load_state_dict(load_file(str(folder / about["file"])))
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("fmt", [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(not (HAS_ONNXRUNTIME and HAS_ONNX_EXPORT), reason=(
        "ONNX is checked with onnxruntime: pip install onnx onnxscript onnxruntime (requirements-dev.txt)"))),
    pytest.param("safetensors", marks=pytest.mark.skipif(not HAS_SAFETENSORS, reason=(
        "pip install safetensors (requirements-dev.txt)"))),
])
def test_exported_logits_match_the_checkpoint(exported, batch, fmt):
    images, expected = batch
    out = exported(fmt)
    about = json.loads((out / "model.json").read_text())
    assert about["class_names"] == fx.shapes_classes() and about["arch"] == "resnet18"
    assert about["preprocessing"]["image_size"] == fx.IMAGE_SIZE and len(about["preprocessing"]["mean"]) == 3
    assert (out / "predict.py").is_file()
    got = _logits(fmt, out, images)
    assert got.shape == expected.shape  # a batch of 3 through a model traced with a batch of 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(not (HAS_ONNXRUNTIME and HAS_ONNX_EXPORT),
                                                  reason="onnx, onnxscript and onnxruntime are not installed")),
    pytest.param("safetensors", marks=pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed")),
])
def test_predict_py_runs_on_its_own_and_agrees(exported, batch, tmp_path, fmt):
    out = exported(fmt)
    image = tmp_path / "red.png"
    image.write_bytes(fx.png_bytes(80))
    ran = subprocess.run([sys.executable, str(out / "predict.py"), str(image)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert ran.returncode == 0, ran.stderr
    bare = subprocess.run([sys.executable, str(out / "predict.py")], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "usage: predict.py [-h] IMAGE [IMAGE ...]" in bare.stderr  # not a silent 0
    _, expected = batch
    probabilities = expected[0].softmax(0)
    best = int(probabilities.argmax())
    assert ran.stdout.startswith(f"{image}: {fx.shapes_classes()[best]} {float(probabilities[best]):.1%}")


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not (HAS_ONNXRUNTIME and HAS_ONNX_EXPORT), reason="onnx, onnxscript and onnxruntime are not installed"))])
def test_predict_py_reads_transparent_and_rotated_images_as_resLens_does(checkpoint, exported, tmp_path, fmt):
    """Transparency over grey, the EXIF orientation, 16-bit grey values (scaled, not clipped white) and a photo
    larger than core.images.MAX_SIDE, as core.images.load_image reads them: the same top-5 as the model (the
    pixels themselves: the next test)."""
    from PIL import Image

    from core.images import load_image

    out = exported(fmt)
    clear = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    clear.paste((200, 30, 30, 255), (15, 5, 45, 35))
    clear.save(tmp_path / "alpha.png")
    turned = Image.new("RGB", (64, 32), (10, 10, 220))
    turned.paste((250, 250, 0), (0, 0, 20, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: to be turned 90 degrees when read
    turned.save(tmp_path / "rot.jpg", exif=exif)
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)  # 16-bit grey: mostly above 255
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    wide = Image.new("RGB", (3000, 900), (20, 120, 20))
    wide.paste((230, 40, 200), (1300, 300, 1700, 600))
    wide.save(tmp_path / "wide.png")
    model, info = load_model(checkpoint)
    transform = info.preprocessing.eval_transform()
    names = ("alpha.png", "rot.jpg", "grey16.png", "wide.png")
    with torch.no_grad():
        expected = model(torch.stack([transform(load_image(tmp_path / n)) for n in names])).softmax(1)
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "rot.jpg").read_bytes()[:300])  # cut short
    ran = subprocess.run([sys.executable, str(out / "predict.py"), "broken.jpg", *names], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert ran.returncode == 1 and "Warning" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    assert ran.stderr.startswith("broken.jpg: cannot be read as an image (")  # and the others still go on
    for name, line, probabilities in zip(names, ran.stdout.splitlines(), expected):
        top = probabilities.topk(min(5, len(probabilities)))
        shown = ", ".join(f"{fx.shapes_classes()[i]} {p:.1%}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        assert line == f"{name}: {shown}"


def test_predict_py_reads_every_image_pixel_for_pixel_as_resLens(tmp_path):
    """The reading predict.py carries gives exactly core.images.load_image's pixels: a large JPEG decoded at a
    reduced scale (its full-size decode differs by up to 10 levels), 16-bit grey, transparency, EXIF, palettes."""
    import sys as system

    from PIL import Image, ImageOps

    from core.images import load_image
    from train.export_model import image_reading

    reading = {"Image": Image, "ImageOps": ImageOps, "np": np, "sys": system}
    exec(image_reading(), reading)  # noqa: S102 - the code predict.py runs, here in a namespace of its own
    photo = Image.effect_noise((4400, 3000), 60).convert("RGB")
    photo.save(tmp_path / "large.jpg", quality=90)
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.new("RGBA", (40, 30), (200, 30, 30, 90)).save(tmp_path / "alpha.png")
    Image.new("P", (30, 30), 3).save(tmp_path / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (50, 20), (9, 99, 199)).save(tmp_path / "turned.jpg", exif=exif)
    for name in ("large.jpg", "grey16.png", "alpha.png", "palette.gif", "turned.jpg"):
        ours, theirs = load_image(tmp_path / name), reading["open_rgb"](str(tmp_path / name))
        assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs)), name


def test_missing_package_and_bad_folder_are_one_sentence(checkpoint, tmp_path, capsys, monkeypatch):
    import train.export_model

    monkeypatch.setitem(train.export_model.NEEDS, "onnx", ("no_such_onnx_package",))
    assert main(["export-model", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs the Python package(s) no_such_onnx_package: pip install" in err and "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(blocker / "sub")]) == 2
    assert "Cannot create the output folder" in capsys.readouterr().err
    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(blocker)]) == 2
    assert f"The output folder {blocker} is a file" in capsys.readouterr().err
    (tmp_path / "taken" / "model.json").mkdir(parents=True)
    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == f"error: Cannot write {tmp_path / 'taken' / 'model.json'}: it is a folder.\n"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["model.json"]  # nothing written before the refusal
    if Path("/sys/kernel").is_dir():  # sysfs: not even root may create a file there
        code = main(["export-model", str(checkpoint), "--format", "torchscript", "--out", "/sys/kernel"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: Cannot write in the output folder /sys/kernel: "), err


def test_files_already_in_the_folder_are_replaced_only_when_asked(checkpoint, tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "predict.py").write_text("# my own script\n")
    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(mine)]) == 2
    assert capsys.readouterr().err == (f"error: The output folder {mine} already holds predict.py: choose another "
                                       "folder, or pass --overwrite to replace them (an earlier export).\n")
    assert [p.name for p in mine.iterdir()] == ["predict.py"]
    assert (mine / "predict.py").read_text() == "# my own script\n"
    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(mine), "--overwrite"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["model.json", "model.pt", "predict.py"]  # no staging left
    assert (mine / "predict.py").read_text().startswith('"""Classify images with the exported model')


def test_a_mid_epoch_last_pt_is_exported_with_a_note(checkpoint, tmp_path, capsys):
    from core.checkpoints import load_checkpoint, save_checkpoint

    assert main(["export-model", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "best")]) == 0
    assert "Note:" not in capsys.readouterr().out
    stopped = save_checkpoint(tmp_path / "last.pt", {**load_checkpoint(checkpoint), "epoch": 3, "batches_done": 17})
    assert main(["export-model", str(stopped), "--format", "torchscript", "--out", str(tmp_path / "last")]) == 0
    out = capsys.readouterr().out  # 3 epochs done, 17 batches into the fourth
    assert "Note: last.pt was saved in the middle of epoch 4 (after 17 batches)" in out
    assert "The stage has no validated model (best.pt) yet." in out
    assert json.loads((tmp_path / "last" / "model.json").read_text())["source"]["batches_done_in_epoch"] == 17


def test_export_zip_holds_the_folder(checkpoint):
    from train.export_model import export_zip

    import io

    bundle = zipfile.ZipFile(io.BytesIO(export_zip(checkpoint, "torchscript")))
    assert sorted(bundle.namelist()) == ["model.json", "model.pt", "predict.py"]
    assert json.loads(bundle.read("model.json"))["format"] == "torchscript"
    assert np.frombuffer(bundle.read("model.pt")[:2], dtype=np.uint8).tolist() == [0x50, 0x4B]  # a zip archive
