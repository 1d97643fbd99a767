"""Issue 11: a damaged image cache is rebuilt with one line, a deleted one does not fail a run, a dead
builder's partial file is swept, unreadable images can be skipped."""
from __future__ import annotations

import shutil

import numpy as np
import torch
import pytest

from core import paths
from core.images import ImageError
from core.run_store import RunStore
from tests.data_fixtures import make_caltech101
from tests.test_engine import TINY_SIZES, one_thread, run_tiny, tiny_config  # noqa: F401
from train.engine import Trainer
from train.image_cache import augmentation, cache_dir, open_cached_split


def _open(root, split="train", options=None):
    cached, _ = open_cached_split("caltech101", str(root), split, options or {}, 37, augmentation("none", 32))
    return cached


def _damage_truncate(path, other):
    path.write_bytes(path.read_bytes()[:-1000])


def _damage_zero(path, other):
    path.write_bytes(bytes(path.stat().st_size))


def _damage_header(path, other):
    data = bytearray(path.read_bytes())
    data[10:40] = b"{'descr': '<f8', 'shape': (9,"
    path.write_bytes(bytes(data))


def _damage_swap(path, other):
    shutil.copyfile(other, path)  # the val split's cache under the train split's name


def _damage_noise(path, other):
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 2
    data[start:start + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_zero, _damage_header, _damage_swap, _damage_noise],
                         ids=["truncated", "zeroed", "header", "swapped", "noise"])
def test_a_damaged_cache_is_rebuilt_with_one_line(tmp_path, damage, capsys):
    root = make_caltech101(tmp_path, TINY_SIZES)
    first = _open(root)
    good = np.array(first.pixels())
    other = _open(root, "val").path
    del first
    capsys.readouterr()
    damage(first_path := _open(root).path, other)
    again = _open(root)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Image cache {first_path} is damaged (" in err and "rebuilding it" in err
    assert np.array_equal(np.array(again.pixels()), good)
    assert [len(again)] == [18] and again[0][0].shape == (3, 32, 32)


def test_an_image_replaced_in_place_gets_a_new_cache(tmp_path):
    from PIL import Image

    root = make_caltech101(tmp_path, TINY_SIZES)
    first, labeled = open_cached_split("caltech101", str(root), "train", {}, 37, augmentation("none", 32))
    before, path = np.array(first.pixels()), first.path
    Image.new("RGB", (40, 40), (255, 255, 255)).save(labeled.files[0], "JPEG")  # same name, other pixels
    again = _open(root)
    assert again.path != path and not np.array_equal(np.array(again.pixels())[0], before[0])
    assert np.array(again.pixels())[0].min() > 240  # the white image, decoded anew


def test_deleting_the_cache_mid_run_does_not_fail_it(tmp_path, monkeypatch):
    real_after = Trainer._after_step

    def after_step(self, st, epoch, loss, lr, images):
        real_after(self, st, epoch, loss, lr, images)
        if st.step == 1:
            shutil.rmtree(cache_dir())  # what the cache's docstring tells users to do

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    assert run_tiny(tiny_config(tmp_path, epochs=(2,))) == "finished"
    assert [m["epoch"] for m in RunStore().metrics("tiny")] == [1, 2]


def test_unreadable_images_fail_by_default_and_can_be_skipped(tmp_path, capsys):
    from train.data_report import format_report, summarize

    root = make_caltech101(tmp_path, TINY_SIZES)
    broken = root / "caltech101" / "101_ObjectCategories" / "ant" / "image_0009.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    with pytest.raises(ImageError, match=r"image_0009.jpg .* A stage with options: \{skip_unreadable: true\} leaves"):
        _open(root)
    skipping = _open(root, options={"skip_unreadable": True})
    err = capsys.readouterr().err
    plain_train = 18  # 3 classes x 8 images, 2 of each held out for val
    assert f"Skipped unreadable image {broken}." in err
    assert f"Skipped unreadable image {broken}." in (_open(root, options={"skip_unreadable": True}) and
                                                      capsys.readouterr().err)  # listed again when reused
    val = _open(root, "val", {"skip_unreadable": True})
    assert len(skipping) + len(val) == plain_train + 6
    kept = [skipping.source(i) for i in range(len(skipping))] + [val.source(i) for i in range(len(val))]
    assert str(broken) not in kept and len(set(kept)) == len(kept) == 24
    classes = ["ant", "bee", "cat"]
    assert all(f"/{classes[t]}/" in skipping.source(i) for i, t in enumerate(skipping.targets))  # still aligned
    report = format_report(summarize("caltech101", root, {}))
    assert "unreadable images: 1" in report and "skip_unreadable" in report and "image_0009.jpg" in report
    assert "Every train image" not in err


def test_a_class_whose_every_image_was_skipped_is_said(tmp_path, capsys):
    root = make_caltech101(tmp_path, TINY_SIZES)
    for path in (root / "caltech101" / "101_ObjectCategories" / "bee").glob("*.jpg"):
        path.write_bytes(b"")
    assert len(_open(root, options={"skip_unreadable": True})) == 12  # ant and cat: 6 train images each
    assert "Every train image of class bee was unreadable and skipped: the class has no train image left." in \
        capsys.readouterr().err


def test_a_run_with_skip_unreadable_lists_and_skips_them(tmp_path, capsys):
    raw = tiny_config(tmp_path, epochs=(1,), options={"skip_unreadable": True})
    broken = tmp_path / "caltech101" / "101_ObjectCategories" / "bee" / "image_0009.jpg"
    broken.write_bytes(b"garbage")
    assert run_tiny(raw) == "finished"
    assert f"Skipped unreadable image {broken}." in capsys.readouterr().err
    strict = tiny_config(tmp_path, epochs=(1,))
    with pytest.raises(ImageError, match="image_0009.jpg"):
        run_tiny(strict, name="strict")
    assert RunStore().get_run("strict")["state"] == "failed"
    assert paths.run_dir("strict").is_dir()


def test_the_cache_is_listed_and_cleared_by_age(tmp_path, capsys, monkeypatch):
    import os
    import time

    from train.cli import main
    from train.image_cache import cache_entries

    root = make_caltech101(tmp_path, TINY_SIZES)
    train_path, val_path = _open(root).path, _open(root, "val").path
    old = time.time() - 10 * 86_400
    os.utime(val_path.with_suffix(".json"), (old, old))  # the val split: last used ten days ago
    entries = cache_entries()
    assert [e.path for e in entries] == [train_path, val_path]  # the most recently used first
    assert entries[0].what.startswith(f"caltech101 (train), 18 images cached at 37 px, root {root}")
    assert entries[1].size == val_path.stat().st_size + val_path.with_suffix(".json").stat().st_size
    _open(root, "val")  # used again: its time moves
    assert cache_entries()[0].path == val_path and cache_entries()[0].last_used > old + 86_400
    os.utime(val_path.with_suffix(".json"), (old, old))

    dead_build = cache_dir() / ".build-dead.npy"  # a builder killed mid-build: nobody holds its lock
    dead_build.write_bytes(bytes(3 << 20))
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "2 cached splits" in listing and "caltech101 (val)" in listing
    assert "Removed the partial files of cache builds whose process died: freed 3.0 MiB." in listing
    assert not dead_build.exists()
    assert main(["cache", "--clear"]) == 2  # no terminal to confirm on: one sentence, nothing deleted
    assert "needs a confirmation" in capsys.readouterr().err and val_path.exists()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["cache", "--clear", "--unused-days", "7"]) == 1 and val_path.exists()
    freed = entries[1].size
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["cache", "--clear", "--unused-days", "7"]) == 0
    assert f"Deleted 1 cached splits; freed {freed / 2**10:.1f} KiB." in capsys.readouterr().out
    assert not val_path.exists() and not val_path.with_suffix(".json").exists() and train_path.exists()
    assert main(["cache", "--unused-days", "7"]) == 2  # only with --clear
    assert main(["cache", "--clear", "--unused-days", "nan", "--yes"]) == 2
    assert main(["cache", "--clear", "--yes"]) == 0 and cache_entries() == []


def test_a_cache_built_before_descriptions_is_listed_as_such(tmp_path):
    import json

    from train.image_cache import cache_entries

    root = make_caltech101(tmp_path, TINY_SIZES)
    path = _open(root).path
    side = json.loads(path.with_suffix(".json").read_text())
    del side["description"]["crop"]  # as cache version 2 wrote it: squares in the middle, for no crop in particular
    path.with_suffix(".json").write_text(json.dumps(side))
    assert cache_entries()[0].what == f"caltech101 (train), 18 images cached at 37 px, root {root} (built by an older " \
                                      "ResLens: no run uses it now)"
    del side["description"]
    path.with_suffix(".json").write_text(json.dumps(side))
    assert cache_entries()[0].what == "18 images cached at 37 px (built by an older ResLens, which did not record " \
                                      "the data set)"
    path.with_suffix(".json").unlink()
    assert cache_entries()[0].what.startswith("no description file (damaged or unfinished)")


@pytest.mark.parametrize("size", [64, 45])
def test_a_cached_image_centre_cropped_is_exactly_the_evaluation_transform(tmp_path, size):
    """Validation crops the cached square again: placed in the middle, that rounded twice and shifted the crop a
    pixel for about half the images, so a class's accuracy was not Explain's on the same files."""
    from PIL import Image
    from torchvision.transforms import functional

    from core.images import load_image
    from core.models import Preprocessing

    shapes = [(98, 73), (73, 98), (101, 80), (80, 125), (77, 77), (300, 91), (91, 300), (150, 100)]
    for split in ("train", "val"):
        for i, shape in enumerate(shapes):
            folder = tmp_path / "imgs" / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.effect_noise(shape, 90).convert("RGB").save(folder / f"{i}.png")
    pre = Preprocessing.for_size(size)
    cached, labeled = open_cached_split("imagefolder", str(tmp_path / "imgs"), "val", {}, pre.resize,
                                        augmentation("none", size), crop=size)
    expected = [functional.pil_to_tensor(functional.center_crop(functional.resize(
        load_image(labeled.source(i)), pre.resize), size)) for i in range(len(labeled))]
    assert all(torch.equal(cached[i][0], expected[i]) for i in range(len(labeled)))
