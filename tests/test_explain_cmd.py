"""`python -m train explain`: overlays per readable image, several layers in one pass, a class per image, file
names that never collide, merged predictions, clear failures (in process, and as a user runs it: a subprocess)."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoints import load_checkpoint, save_checkpoint
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
                   "--layer", "layer3", "--out", str(out), "--top-k", "2"])
    assert status == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err
    report = json.loads((out / "predictions.json").read_text())
    dog, cat = (f"{stem}_layer3_gradcam_{r['explained_class']}.png" for stem, r in zip(("dog", "cat"), report["images"]))
    assert sorted(p.name for p in out.iterdir()) == sorted([cat, dog, "predictions.json", "predictions.csv"])
    width, height = _png_size(out / dog)
    assert width == 60 and height > 40  # original resolution, colour bar below
    assert _png_size(out / cat)[0] == 30
    assert [Path(r["image"]).name for r in report["images"]] == ["dog.jpg", "cat.png"]
    assert report["failed"][0]["image"].endswith("broken.jpg") and report["failed"][0]["error"]
    for record in report["images"]:
        probabilities = [p["probability"] for p in record["predictions"]]
        assert len(probabilities) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert record["explained_class"] == record["predictions"][0]["class"]  # default: the top-1 class
        assert record["predictions"][0]["class"] in captured.out


def test_a_closed_pipe_stops_the_printing_not_the_work(checkpoint, inputs, tmp_path, monkeypatch):
    """`explain ... | head -1`: the reader goes after the first line; every overlay and the predictions are still
    written (the command used to stop at its second line, leaving no predictions file)."""
    class ClosedPipe(io.TextIOWrapper):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe(open(tmp_path / "stdout", "wb")))
    out = tmp_path / "out"
    assert main(["explain", str(checkpoint), str(inputs["dog"]), str(inputs["cat"]), "--out", str(out)]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in report["images"]] == ["dog.jpg", "cat.png"]
    assert all((out / name).is_file() for r in report["images"] for name in r["overlays"].values())


def test_all_readable_gives_status_zero_and_target_by_name_or_index_is_the_same(checkpoint, inputs, tmp_path):
    by_name, by_index = tmp_path / "a", tmp_path / "b"
    common = [str(checkpoint), str(inputs["dog"]), "--layer", "layer3.1.bn2", "--method", "gradcam++"]
    assert main(["explain", *common, "--target", "Triangle", "--out", str(by_name)]) == 0
    assert main(["explain", *common, "--target", "2", "--out", str(by_index)]) == 0
    name = "dog_layer3.1.bn2_gradcampp_triangle.png"
    assert (by_name / name).read_bytes() == (by_index / name).read_bytes()
    record = json.loads((by_name / "predictions.json").read_text())["images"][0]
    assert (record["explained_class"], record["explained_index"]) == ("triangle", 2)


def test_same_stem_twice_gets_two_files(checkpoint, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    twin = _write_image(other / "dog.png", 20, 20, 3)
    out = tmp_path / "out"
    assert main(["explain", str(checkpoint), str(inputs["dog"]), str(twin), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))  # the recommended layer: layer1 (8x8) at 32 px
    assert len(names) == 2 and names[0].startswith("dog-2_layer1_gradcam_") and names[1].startswith("dog_layer1_")


def test_a_later_call_never_overwrites_the_maps_of_another_image_with_the_same_name(checkpoint, inputs, tmp_path):
    """Caltech names its files image_0001.jpg in every class folder, phones IMG_0001.JPG: calls one after the
    other must keep both maps; the same image again replaces its own."""
    (tmp_path / "b").mkdir()
    twin = _write_image(tmp_path / "b" / "dog.png", 20, 20, 3)
    out = tmp_path / "out"
    for image in (inputs["dog"], twin, inputs["dog"]):
        assert main(["explain", str(checkpoint), str(image), "--target", "0", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert [n.split("_")[0] for n in names] == ["dog-2", "dog"]  # two images, two maps; the third call replaced
    records = json.loads((out / "predictions.json").read_text())["images"]
    assert sorted((r["image"], *r["overlays"].values()) for r in records) == sorted(
        [(str(inputs["dog"]), names[1]), (str(twin), names[0])])


def test_the_same_relative_path_typed_in_two_folders_is_two_images(checkpoint, tmp_path, monkeypatch):
    """`cd a; explain dog.png` then `cd b; explain dog.png`: two images, so two maps and two records (the second
    used to overwrite the first's, both being 'dog.png')."""
    for folder, seed in (("a", 1), ("b", 3), ("a", 1)):
        (tmp_path / folder).mkdir(exist_ok=True)
        _write_image(tmp_path / folder / "dog.png", 20, 20, seed)
        monkeypatch.chdir(tmp_path / folder)
        assert main(["explain", str(checkpoint), "dog.png", "--target", "0", "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert sorted((r["path"], *r["overlays"].values()) for r in records) == [
        (str(tmp_path / "a" / "dog.png"), "dog_layer1_gradcam_circle.png"),
        (str(tmp_path / "b" / "dog.png"), "dog-2_layer1_gradcam_circle.png")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["dog-2_layer1_gradcam_circle.png",
                                                                      "dog_layer1_gradcam_circle.png"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "hexagon"], "no class named 'hexagon'"),
        (["--target", "7"], "out of range"),
        (["--target", "²"], "no class named '²'"),  # a digit to str.isdigit, no number to int
        (["--layer", "layer9"], "no layer 'layer9'; valid layers: conv1, bn1, relu, maxpool, layer1"),
        (["--layer", "layer4"], "Layer 'layer4' has no single spatial map at 32 px (it is 1x1"),
        (["--target", "dog.jpg=hexagon"], "no class named 'hexagon'"),
        (["--target", "cat.jpg=Triangle"], "--target cat.jpg=Triangle: cat.jpg is not one of the images given, and "
                                           "the model has no class named 'cat.jpg=Triangle'."),
        pytest.param(["--device", "cuda"], "sees no CUDA GPU", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has a GPU")),
    ],
)
def test_bad_requests_stop_with_one_sentence(checkpoint, inputs, tmp_path, capsys, extra, message):
    status = main(["explain", str(checkpoint), str(inputs["dog"]), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_an_out_folder_that_is_a_file_is_one_sentence(checkpoint, inputs, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["explain", str(checkpoint), str(inputs["dog"]), "--out", str(tmp_path / "out")]) == 2
    assert f"--out {tmp_path / 'out'} is a file; name a folder" in capsys.readouterr().err


def test_unloadable_checkpoint_stops_with_a_clear_sentence(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.pt"):
        status = main(["explain", str(path), str(inputs["dog"]), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert status != 0 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_several_layers_take_one_pass(checkpoint, inputs, tmp_path, monkeypatch):
    import core.gradcam
    import train.explain_cmd

    calls = []
    monkeypatch.setattr(train.explain_cmd, "explain", lambda *a, **k: calls.append(a[2]) or core.gradcam.explain(*a, **k))
    out = tmp_path / "out"
    assert main(["explain", str(checkpoint), str(inputs["dog"]), str(inputs["cat"]), "--layer", "layer3",
                 "--layer", "layer2.1.bn2", "--out", str(out)]) == 0
    assert calls == [["layer3", "layer2.1.bn2"]]  # both images, both layers: one explain call
    assert len(list(out.glob("dog_layer3_gradcam_*.png"))) == len(list(out.glob("cat_layer2.1.bn2_*.png"))) == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "explain", *args], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)


def test_cli_per_image_classes_layers_and_methods_accumulate(checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    first = _cli(str(checkpoint), str(inputs["dog"]), str(inputs["cat"]), "--layer", "layer3", "--layer", "layer2",
                 "--target", "dog.jpg=triangle", "--target", f"{inputs['cat']}=0", "--npy", "--out", str(out))
    assert first.returncode == 0, first.stderr
    second = _cli(str(checkpoint), str(inputs["dog"]), "--method", "layercam", "--target", "square", "--layer",
                  "layer3", "--scale", "shared", "--out", str(out))
    assert second.returncode == 0, second.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cat_layer2_gradcam_circle.png", "cat_layer3_gradcam_circle.png",
                    "dog_layer2_gradcam_triangle.png", "dog_layer3_gradcam_triangle.png",
                    "dog_layer3_layercam_square.png"]  # nothing of the first call was overwritten
    maps = np.load(out / "dog_layer2_gradcam_triangle.npy")
    assert maps.shape == (32, 32) and maps.dtype == np.float32 and maps.max() > 0
    report = json.loads((out / "predictions.json").read_text())
    assert [(Path(r["image"]).name, r["method"], r["explained_class"]) for r in report["images"]] == [
        ("dog.jpg", "gradcam", "triangle"), ("cat.png", "gradcam", "circle"), ("dog.jpg", "layercam", "square")]
    assert report["images"][0]["ood"]["level"] == "unknown"  # this checkpoint stores no thresholds
    rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    assert len(rows) == 3 * 3 and {r["explained_class"] for r in rows} == {"triangle", "circle", "square"}
    assert "(explaining triangle)" in first.stdout


def test_a_later_call_that_rewrites_a_map_takes_it_from_the_earlier_record(checkpoint, inputs, tmp_path):
    """layer1 and layer2 explained, then layer2 again with other options: the file is the second call's, so the
    first record keeps layer1 only (it went on naming the rewritten file), and the CSV says which rows are which."""
    out = tmp_path / "out"
    assert main(["explain", str(checkpoint), str(inputs["dog"]), "--layer", "layer1", "--layer", "layer2",
                 "--target", "0", "--out", str(out)]) == 0
    assert main(["explain", str(checkpoint), str(inputs["dog"]), "--layer", "layer2", "--aug-smooth",
                 "--target", "0", "--out", str(out)]) == 0
    records = json.loads((out / "predictions.json").read_text())["images"]
    assert [(r["layers"], r["overlays"], r["smoothing"]) for r in records] == [
        (["layer1"], {"layer1": "dog_layer1_gradcam_circle.png"}, []),
        (["layer2"], {"layer2": "dog_layer2_gradcam_circle.png"}, ["aug"])]
    rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    assert sorted({(r["method"], r["layers"]) for r in rows}) == [("gradcam", "layer1"), ("gradcam", "layer2")]


def test_a_call_waits_for_another_writing_into_the_same_folder(checkpoint, inputs, tmp_path, capsys):
    """Calls side by side (`xargs -P`) into one --out: each merges its records after the other's (they used to
    read the same predictions.json and keep only the last writer's records)."""
    import fcntl
    import threading
    import time

    out = tmp_path / "out"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # another call, busy writing there
    ended = []
    call = threading.Thread(target=lambda: ended.append(main(["explain", str(checkpoint), str(inputs["dog"]),
                                                                "--out", str(out)])))
    call.start()
    said = ""
    deadline = time.monotonic() + 60
    while "waiting for another explain" not in said and time.monotonic() < deadline:
        time.sleep(0.05)
        said += capsys.readouterr().err
    assert f"waiting for another explain that writes into {out}" in said and not (out / "predictions.json").exists()
    os.close(other)
    call.join(timeout=60)
    assert ended == [0] and (out / "predictions.json").is_file()


def test_cli_unknown_layer_lists_the_valid_ones(checkpoint, inputs, tmp_path):
    done = _cli(str(checkpoint), str(inputs["dog"]), "--layer", "layer5", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no layer 'layer5'" in done.stderr and "layer3.1.bn2" in done.stderr and "gradcam(" not in done.stderr


def test_images_whose_names_differ_after_a_dot_get_their_own_files():
    from core.explain_files import map_name, unique_stems

    stems = unique_stems(["x/a.v1.jpg", "y/a.v2.jpg"])
    assert len({map_name(s, "layer4", "gradcam", "cat") for s in stems}) == 2
    stems = unique_stems(["a/my dog.jpg", "b/my_dog.jpg", "c/my-dog.png"])  # one name once made safe
    assert stems == ["my-dog", "my-dog-2", "my-dog-3"]
    assert len({map_name(s, "layer4", "gradcam", "cat") for s in stems}) == 3


def test_classes_whose_names_are_one_once_made_safe_get_their_own_files(checkpoint, inputs, tmp_path):
    from core.explain_files import class_parts

    renamed = tmp_path / "renamed.pt"
    save_checkpoint(renamed, {**load_checkpoint(checkpoint), "class_names": ["a b", "a_b", *CLASSES[2:]]})
    for target in ("a b", "a_b"):
        assert main(["explain", str(renamed), str(inputs["dog"]), "--target", target, "--out", str(tmp_path / "o")]) == 0
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())["images"]
    files = {r["explained_class"]: r["overlays"]["layer1"] for r in records}
    assert len(set(files.values())) == 2 and all((tmp_path / "o" / f).is_file() for f in files.values())
    parts = class_parts(["a b", "a_b", "C++", "Cpp", "wild_cat", "dog"])
    assert len(set(parts.values())) == 6  # 'a b' and 'a_b' were both 'a-b'; 'C++' and 'Cpp' both 'Cpp'
    assert (parts["wild_cat"], parts["dog"]) == ("wild-cat", "dog")  # a name no other class shares stays short
    assert parts["a b"].startswith("a-b-") and parts["C++"].startswith("Cpp-")


@pytest.mark.parametrize("foreign", [b"[1, 2, 3]", b'{"model": "someone else\'s"}', b"not json"])
def test_a_predictions_file_not_ours_is_left_alone_and_nothing_is_written(checkpoint, inputs, tmp_path, capsys,
                                                                          foreign):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "predictions.json").write_bytes(foreign)
    assert main(["explain", str(checkpoint), str(inputs["dog"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'predictions.json'} exists and is not a predictions file of `python -m train explain`" in err
    assert (out / "predictions.json").read_bytes() == foreign and [p.name for p in out.iterdir()] == ["predictions.json"]


def test_long_and_non_latin_class_names_make_short_distinct_file_names():
    from core.explain_files import map_name

    long_a, long_b = "L" * 240 + "a", "L" * 240 + "b"
    names = [map_name("dog", "layer4.2.conv3", "gradcampp", c) for c in (long_a, long_b, "猫", "Ünïcode name")]
    assert all(len(n.encode()) <= 255 for n in names) and names[0] != names[1]
    assert names[2] == "dog_layer4.2.conv3_gradcampp_猫.png" and names[3].endswith("_Ünïcode-name.png")


def test_predictions_csv_does_not_hand_formulas_to_a_spreadsheet():
    import csv
    import io

    import numpy as np

    from core.explain_files import prediction_record, predictions_csv

    record = prediction_record("=HYPERLINK(1)", np.array([0.7, 0.3]), ["=cmd|' /C calc'!A0", "-cat"], 0)
    rows = list(csv.DictReader(io.StringIO(predictions_csv([record]))))
    assert [r["class"] for r in rows] == ["'=cmd|' /C calc'!A0", "'-cat"]
    assert rows[0]["image"] == "'=HYPERLINK(1)" and rows[0]["explained_class"] == "'=cmd|' /C calc'!A0"
