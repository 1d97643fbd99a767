"""core.datasets: each loader read through a fixture tree in its real layout."""
from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import datasets
from core.datasets import DATASETS, DatasetError, DatasetMissing, class_counts, open_dataset, split_files
from core.errors import UserError
from tests.data_fixtures import (CALTECH101_SIZES, CALTECH256_SIZES, CIFAR_CLASSES, CIFAR_TEST_LABELS,
                                 CIFAR_TRAIN_LABELS, TINY_TRAIN_PER_CLASS, TINY_VAL, TINY_WNIDS, make_caltech101,
                                 make_caltech256, make_cifar100, make_tinyimagenet, serve_tinyimagenet_zip)


def _both_splits(name: str, root: Path, **options) -> dict[str, dict[str, int]]:
    return {split: class_counts(name, root, split, **options) for split in ("train", "val")}


def test_registry_names():
    assert {"tinyimagenet", "cifar100", "caltech101", "caltech256", "shapes", "shapes-lt"} <= set(DATASETS)


# ------------------------------------------------------------------ Caltech-101


def test_caltech101_classes_drop_background_and_sort_like_torchvision(tmp_path):
    ds = open_dataset("caltech101", make_caltech101(tmp_path))
    assert ds.classes == ["Faces", "Leopards", "accordion", "airplanes", "yin_yang"]
    assert ds.excluded == {"BACKGROUND_Google": 2}


def test_caltech_classes_match_torchvision(tmp_path):
    import torchvision.datasets

    root = make_caltech256(make_caltech101(tmp_path))
    assert open_dataset("caltech101", root).classes == torchvision.datasets.Caltech101(str(root)).categories
    everything = open_dataset("caltech256", root, include_clutter=True).classes
    assert everything == torchvision.datasets.Caltech256(str(root)).categories


def test_caltech101_counts_agree_with_files_and_splits_partition_them(tmp_path):
    root = make_caltech101(tmp_path)
    counts = _both_splits("caltech101", root)
    for cls, n in CALTECH101_SIZES.items():
        if cls != "BACKGROUND_Google":
            assert counts["train"][cls] + counts["val"][cls] == n
    train, val = open_dataset("caltech101", root, "train"), open_dataset("caltech101", root, "val")
    assert train.class_counts() == counts["train"] and val.class_counts() == counts["val"]
    files = {train.source(i) for i in range(len(train))} | {val.source(i) for i in range(len(val))}
    on_disk = {str(p) for p in (root / "caltech101" / "101_ObjectCategories").glob("*/*.jpg")
               if p.parent.name != "BACKGROUND_Google"}
    assert files == on_disk and len(train) + len(val) == len(on_disk)


def test_caltech_split_is_stratified_with_the_documented_sizes(tmp_path):
    counts = _both_splits("caltech101", make_caltech101(tmp_path))
    # val = round(0.2 * n), at least 1 when n >= 2, none for a single image
    assert counts["val"] == {"Faces": 1, "Leopards": 1, "accordion": 1, "airplanes": 1, "yin_yang": 0}
    assert all(counts["train"][c] >= 1 for c in counts["train"])


def test_caltech_split_is_deterministic_and_depends_on_seed(tmp_path):
    root = make_caltech101(tmp_path, {"a": 20, "b": 10})
    first = open_dataset("caltech101", root, "val")
    again = open_dataset("caltech101", root, "val")
    assert [first.source(i) for i in range(len(first))] == [again.source(i) for i in range(len(again))]
    other = open_dataset("caltech101", root, "val", seed=1)
    assert {first.source(i) for i in range(len(first))} != {other.source(i) for i in range(len(other))}
    assert first.class_counts() == other.class_counts() == {"a": 4, "b": 2}


def test_split_order_is_a_fixed_hash_not_pythons_hash():
    files = [Path(f"image_{i:04d}.jpg") for i in range(1, 11)]
    val = split_files(files, "cup", "val", val_fraction=0.3, seed=0)
    # pinned: SHA-256 of "seed/class/file" gives the same split on every machine and in every process
    assert [p.name for p in val] == ["image_0004.jpg", "image_0007.jpg", "image_0010.jpg"]
    assert split_files(list(reversed(files)), "cup", "val", val_fraction=0.3) == val
    train = split_files(files, "cup", "train", val_fraction=0.3, seed=0)
    assert sorted(val + train) == sorted(files)


def test_train_per_class_protocol(tmp_path):
    root = make_caltech101(tmp_path, {"a": 8, "b": 3, "c": 1})
    counts = _both_splits("caltech101", root, train_per_class=5)
    assert counts["train"] == {"a": 5, "b": 2, "c": 1}
    assert counts["val"] == {"a": 3, "b": 1, "c": 0}


def test_grayscale_caltech_image_comes_out_rgb(tmp_path):
    ds = open_dataset("caltech101", make_caltech101(tmp_path), "train")
    gray = [i for i in range(len(ds)) if Image.open(ds.source(i)).mode == "L"]
    assert gray, "the fixture has grayscale images"
    image, target = ds[gray[0]]
    assert image.mode == "RGB" and target == ds.targets[gray[0]]
    assert ds.load_raw(gray[0]).size == (24, 16)


def test_transform_is_applied(tmp_path):
    ds = open_dataset("caltech101", make_caltech101(tmp_path), transform=lambda im: np.asarray(im).shape)
    assert ds[0][0] == (16, 24, 3)


def test_bad_split_options_are_user_errors(tmp_path):
    root = make_caltech101(tmp_path)
    with pytest.raises(DatasetError, match="val_fraction must be between 0 and 1"):
        open_dataset("caltech101", root, val_fraction=1.5)
    with pytest.raises(DatasetError, match="has no option 'include_clutter'"):
        class_counts("caltech101", root, include_clutter=True)
    with pytest.raises(DatasetError, match="Unknown split 'test'"):
        open_dataset("caltech101", root, "test")
    with pytest.raises(DatasetError, match="Unknown data set 'imagenet'"):
        open_dataset("imagenet", root)


# ------------------------------------------------------------------ Caltech-256


def test_caltech256_clutter_is_an_option(tmp_path):
    root = make_caltech256(tmp_path)
    ds = open_dataset("caltech256", root)
    assert ds.classes == ["001.ak47", "002.american-flag", "145.motorbikes-101"]
    assert ds.class_labels == ["ak47", "american-flag", "motorbikes"]
    assert ds.excluded == {"257.clutter": 2}
    with_clutter = _both_splits("caltech256", root, include_clutter=True)
    assert "257.clutter" in with_clutter["train"]
    for cls, n in CALTECH256_SIZES.items():  # the stray RENAME2 file is not an image
        assert with_clutter["train"][cls] + with_clutter["val"][cls] == n


def test_caltech256_reads_images_as_rgb(tmp_path):
    ds = open_dataset("caltech256", make_caltech256(tmp_path), "val")
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))
    assert all(ds.source(i).endswith(".jpg") for i in range(len(ds)))


# ------------------------------------------------------------------ Tiny ImageNet


def test_tinyimagenet_train_and_val_layouts(tmp_path):
    root = make_tinyimagenet(tmp_path)
    train = open_dataset("tinyimagenet", root, "train")
    assert train.classes == sorted(TINY_WNIDS)
    assert train.class_labels == ["goldfish", "European fire salamander", "tabby"]
    assert class_counts("tinyimagenet", root, "train") == dict.fromkeys(sorted(TINY_WNIDS), TINY_TRAIN_PER_CLASS)
    val = open_dataset("tinyimagenet", root, "val")
    expected = {Path(root, "tiny-imagenet-200", "val", "images", n).as_posix(): w for n, w in TINY_VAL}
    assert {val.source(i): val.classes[val.targets[i]] for i in range(len(val))} == expected
    assert class_counts("tinyimagenet", root, "val") == {"n01443537": 1, "n01629819": 1, "n02123045": 3}
    image, _ = val[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_tinyimagenet_malformed_annotations_are_a_clear_error(tmp_path):
    root = make_tinyimagenet(tmp_path)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"does not name a class \(a folder of train/\)"):
        class_counts("tinyimagenet", root, "val")
    shutil.rmtree(root / "tiny-imagenet-200" / "train" / TINY_WNIDS[0] / "images")
    with pytest.raises(DatasetError, match=f"{TINY_WNIDS[0]}/images is missing"):
        open_dataset("tinyimagenet", root, "train")


# ------------------------------------------------------------------ CIFAR-100


def test_cifar100_reads_the_python_pickles(tmp_path):
    root = make_cifar100(tmp_path)
    train = open_dataset("cifar100", root, "train")
    assert train.classes == list(CIFAR_CLASSES)
    assert train.targets == list(CIFAR_TRAIN_LABELS)
    image, target = train[3]
    assert image.size == (32, 32) and image.mode == "RGB" and target == 0
    raw = pickle.loads((root / "cifar-100-python" / "train").read_bytes())[b"data"][3]
    assert np.array_equal(np.asarray(image), raw.reshape(3, 32, 32).transpose(1, 2, 0))
    assert class_counts("cifar100", root, "val") == {"apple": 1, "aquarium_fish": 1, "baby": 2}
    assert open_dataset("cifar100", root, "val").targets == list(CIFAR_TEST_LABELS)


def test_cifar100_pickle_missing_a_key_is_a_clear_error(tmp_path):
    root = make_cifar100(tmp_path)
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match="lacks the CIFAR-100 key 'fine_labels'"):
        class_counts("cifar100", root, "val")


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_cifar100_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    root = make_cifar100(tmp_path)
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": _Boom()}))
    with pytest.raises(DatasetError, match="not a readable CIFAR-100 pickle.*builtins.print"):
        open_dataset("cifar100", root)
    assert "code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------ synthetic sets


def test_shapes_sets_are_registered_and_counted_without_files(tmp_path):
    ds = open_dataset("shapes-lt", tmp_path / "ignored", "val")
    counts = class_counts("shapes-lt", split="val")
    assert sum(counts.values()) == len(ds) and max(counts.values()) > min(counts.values())
    assert ds.source(0) == "shapes-lt:val:0" and ds[0][0].mode == "RGB"


# ------------------------------------------------------------------ missing data, download


@pytest.mark.parametrize("name", ["caltech101", "caltech256", "tinyimagenet", "cifar100"])
def test_missing_data_set_names_the_path_and_the_command(tmp_path, name):
    with pytest.raises(DatasetMissing) as info:
        class_counts(name, tmp_path)
    message = str(info.value)
    assert str(tmp_path / DATASETS[name].folder) in message
    assert f"python -m train data {name} --root {tmp_path} --download" in message
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)


def test_root_pointing_inside_the_data_set_suggests_the_right_root(tmp_path):
    make_caltech101(tmp_path)
    for wrong in (tmp_path / "caltech101", tmp_path / "caltech101" / "101_ObjectCategories"):
        with pytest.raises(DatasetMissing, match=f"pass {tmp_path} as the root"):
            class_counts("caltech101", wrong)


def test_default_root_is_reslens_data(monkeypatch, tmp_path):
    make_caltech101(tmp_path)
    monkeypatch.setenv("RESLENS_DATA", str(tmp_path))
    assert "Faces" in class_counts("caltech101")


def test_download_refuses_generated_sets():
    with pytest.raises(DatasetError, match="generated by ResLens"):
        datasets.download("shapes")


@pytest.fixture
def archive_server(tmp_path):
    with serve_tinyimagenet_zip(tmp_path / "server") as served:
        yield served


def test_download_fetches_extracts_and_reports_progress(tmp_path, monkeypatch, archive_server):
    url, archive = archive_server
    monkeypatch.setitem(DATASETS, "tinyimagenet", replace(DATASETS["tinyimagenet"], url=url))
    calls = []
    root = tmp_path / "data"
    folder = datasets.download("tinyimagenet", root, progress=lambda done, total: calls.append((done, total)))
    assert folder == root / "tiny-imagenet-200"
    assert class_counts("tinyimagenet", root) == dict.fromkeys(sorted(TINY_WNIDS), TINY_TRAIN_PER_CLASS)
    assert calls[-1] == (archive.stat().st_size, archive.stat().st_size)
    assert not (root / "tiny-imagenet-200.zip").exists()  # the archive is removed after extraction
    assert datasets.download("tinyimagenet", root) == folder  # present: nothing fetched again


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch, archive_server):
    url, _ = archive_server
    monkeypatch.setitem(DATASETS, "tinyimagenet", replace(DATASETS["tinyimagenet"], url=url + ".missing"))
    with pytest.raises(DatasetError, match=r"Downloading Tiny ImageNet from http://127\.0\.0\.1.* failed"):
        datasets.download("tinyimagenet", tmp_path / "data")


def test_a_download_that_dies_mid_extraction_leaves_no_half_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"

    def dies_while_extracting(base, url):
        (base / "tiny-imagenet-200" / "train").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(DATASETS, "tinyimagenet", replace(DATASETS["tinyimagenet"], fetcher=dies_while_extracting))
    with pytest.raises(DatasetError, match="No space left"):
        datasets.download("tinyimagenet", root)
    assert not (root / "tiny-imagenet-200").exists()  # the next download starts afresh instead of "finding" it


def test_a_download_stopped_by_ctrl_c_leaves_nothing_that_passes_for_the_data_set(tmp_path, monkeypatch):
    """Only errors were cleaned up: a Ctrl-C (or the app's stop) left a class folder that counted as the download."""
    root = tmp_path / "data"

    def interrupted(base, url):
        (base / "caltech101" / "101_ObjectCategories" / "accordion").mkdir(parents=True)
        (base / "caltech101" / "caltech-101.zip").write_bytes(b"PK")  # where torchvision downloads it
        raise KeyboardInterrupt

    monkeypatch.setitem(DATASETS, "caltech101", replace(DATASETS["caltech101"], fetcher=interrupted))
    with pytest.raises(KeyboardInterrupt):
        datasets.download("caltech101", root)
    assert list(root.iterdir()) == []  # no archive, no half folder, not even an empty caltech101/
    mine = root / "caltech101" / "caltech-101.zip"  # an archive the user put there: used, and kept
    mine.parent.mkdir()
    mine.write_bytes(b"PK")
    with pytest.raises(KeyboardInterrupt):
        datasets.download("caltech101", root)
    assert [p.relative_to(root).as_posix() for p in root.rglob("*")] == ["caltech101", "caltech101/caltech-101.zip"]


def test_a_failed_download_says_how_to_fetch_it_by_hand(tmp_path, monkeypatch):
    def offline(base, url):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setitem(DATASETS, "caltech101", replace(DATASETS["caltech101"], fetcher=offline))
    with pytest.raises(DatasetError, match=r"failed: .*Name or service not known>\. Or fetch https://\S+ yourself and "
                                           rf"unpack it so that {re.escape(str(tmp_path / 'caltech101'))}\S* exists\."):
        datasets.download("caltech101", tmp_path)


def test_caltech_class_folders_without_images_are_left_out_and_said(tmp_path):
    make_caltech101(tmp_path)
    categories = tmp_path / "caltech101" / "101_ObjectCategories"
    (categories / "zebra").mkdir()  # an unpack cut short: the folder made, no image yet
    listed = open_dataset("caltech101", tmp_path, "train")
    assert "zebra" not in listed.classes and listed.excluded["zebra"] == 0
    assert listed.notes == [f"1 class folder(s) hold no images and are left out (zebra): the data set may be partly "
                            f"unpacked; delete {categories.parent} and download it again."]
    only_clutter = tmp_path / "c256" / "caltech256" / "256_ObjectCategories" / "257.clutter"
    only_clutter.mkdir(parents=True)
    shutil.copy(next(categories.glob("*/*.jpg")), only_clutter / "257_0001.jpg")
    with pytest.raises(DatasetError, match=r"256_ObjectCategories holds no class folders with images \(only "
                                           r"257\.clutter, which is not a class by default\)\."):
        open_dataset("caltech256", tmp_path / "c256", "train")
    (only_clutter.parent / "001.ak47").mkdir()  # and a class folder an unpack cut short: that is the cause
    with pytest.raises(DatasetError, match=r"holds no class folders with images: it may be partly unpacked"):
        open_dataset("caltech256", tmp_path / "c256", "train")
