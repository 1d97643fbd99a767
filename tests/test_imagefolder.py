"""`dataset: imagefolder` (your own folder of class folders, either layout) and Tiny ImageNet's cut wnids.txt:
the loader, config validation, the data report, and a training stage on each layout."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from core import datasets
from core.datasets import DatasetError, DatasetMissing, class_counts, open_dataset, split_files
from core.run_store import RunStore
from tests.data_fixtures import (IMAGEFOLDER_SIZES, IMAGEFOLDER_VAL_SIZES, TINY_VAL, TINY_WNIDS, make_imagefolder,
                                 make_tinyimagenet)
from train.cli import main
from train.config import ConfigError, parse_config

CLASSES = sorted(IMAGEFOLDER_SIZES)


# ------------------------------------------------------------------ the loader


def test_flat_folder_is_split_per_class_by_the_caltech_hash(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    train, val = (open_dataset("imagefolder", root, split) for split in ("train", "val"))
    assert train.classes == val.classes == CLASSES and train.class_labels == CLASSES
    for name, n in IMAGEFOLDER_SIZES.items():
        files = sorted((root / name).glob(f"{name}_*"))  # the images, not notes.txt / .DS_Store / .hidden_*
        assert len(files) == n
        mine = {split: [p for p, t in zip(ds.files, ds.targets) if ds.classes[t] == name]
                for split, ds in (("train", train), ("val", val))}
        assert mine == {split: split_files(files, name, split) for split in ("train", "val")}
    assert all(p.name.split("_")[0] in CLASSES and not p.name.startswith(".") for p in train.files + val.files)
    assert {p.suffix for p in train.files + val.files} == {".jpg", ".PNG", ".webp", ".bmp", ".gif", ".TIFF", ".jpeg"}
    assert all(train[i][0].mode == "RGB" for i in range(len(train)))  # every format decodes
    assert class_counts("imagefolder", root, "train", train_per_class=1) == dict.fromkeys(CLASSES, 1)
    assert "hash" in train.notes[0]
    assert not any("outside any class folder" in n for n in train.notes)
    shutil.copy(train.files[0], root / "stray.jpg")
    assert f"1 image lies directly in {root}, outside any class folder: not used." in \
        open_dataset("imagefolder", root, "train").notes


def test_train_and_val_folders_are_the_split(tmp_path):
    root = make_imagefolder(tmp_path / "pets", "split")
    (root / "test" / "unlabelled").mkdir(parents=True)
    assert class_counts("imagefolder", root, "train") == IMAGEFOLDER_SIZES
    assert class_counts("imagefolder", root, "val") == IMAGEFOLDER_VAL_SIZES
    val = open_dataset("imagefolder", root, "val")
    assert all(root / "val" in p.parents for p in val.files) and val.excluded == {"test": 0}
    with pytest.raises(DatasetError, match="own train/ and val/ folders, so the split option val_fraction"):
        class_counts("imagefolder", root, "train", val_fraction=0.3)
    (root / "val" / "emu").mkdir()
    shutil.copy(next((root / "val" / "cat").glob("cat_0.*")), root / "val" / "emu" / "emu.jpg")
    with pytest.raises(DatasetError, match=r"val/emu is not a class: there is no .*train/emu"):
        class_counts("imagefolder", root, "val")


def test_a_val_class_named_in_another_unicode_form_than_its_train_class_is_said_so(tmp_path):
    import unicodedata

    root = make_imagefolder(tmp_path / "pets", "split")
    (root / "train" / "cat").rename(root / "train" / unicodedata.normalize("NFC", "café"))
    (root / "val" / "cat").rename(root / "val" / unicodedata.normalize("NFD", "café"))
    with pytest.raises(DatasetError, match=r"look alike but are not one class: 'cafe\\u0301' and 'caf\\xe9' are "
                                           r"one name written in two Unicode forms"):
        class_counts("imagefolder", root, "val")


def test_class_folders_that_are_one_folder_through_links_are_said(tmp_path):
    """Links are followed (a set assembled from links is common), but two classes sharing one folder count the same
    images in both: a note says so. A val/ class linked to its train/ folder would validate on training images."""
    root = make_imagefolder(tmp_path / "pets")
    (root / "kitten").symlink_to(root / "cat")
    (root / "moggy").symlink_to(root / "cat")
    train = open_dataset("imagefolder", root, "train")
    assert train.class_labels == sorted([*CLASSES, "kitten", "moggy"])  # followed: each is a class
    assert (f"Class folders cat, kitten and moggy in {root} are the same folder ({(root / 'cat').resolve()}, "
            "through links): its images count in each of these classes.") in train.notes
    elsewhere = make_imagefolder(tmp_path / "more", sizes={"dogs": 3, "x": 2})
    (root / "dog" / "more").symlink_to(elsewhere / "dogs")  # a linked sub-folder from outside counts in its class
    (root / "dog" / "owls").symlink_to(root / "owl")  # one into another class does not: its images would count twice
    (root / "owl" / "loop").symlink_to(root)  # nor a link back up the tree: the walk ends
    both = [class_counts("imagefolder", root, s) for s in ("train", "val")]
    assert sum(c["owl"] for c in both) == IMAGEFOLDER_SIZES["owl"]
    assert sum(c["dog"] for c in both) == IMAGEFOLDER_SIZES["dog"] + 3
    split = make_imagefolder(tmp_path / "split", "split")
    (split / "train" / "cat" / "extra").symlink_to(split / "val" / "cat")  # validation images are never trained on
    assert class_counts("imagefolder", split, "train") == IMAGEFOLDER_SIZES
    assert not any("same folder" in n for n in open_dataset("imagefolder", split, "val").notes)
    shutil.rmtree(split / "val" / "cat")
    (split / "val" / "cat").symlink_to(split / "train" / "cat")
    with pytest.raises(DatasetError, match=r"val/cat and .*train/cat are the same folder \(a link\): validation "
                                           "would score the training images"):
        open_dataset("imagefolder", split, "train")


def test_a_class_without_a_val_folder_is_a_class_with_no_validation_images(tmp_path):
    root = make_imagefolder(tmp_path / "pets", "split")
    shutil.rmtree(root / "val" / "cat")
    assert class_counts("imagefolder", root, "train") == IMAGEFOLDER_SIZES  # no longer "Cannot read val/cat"
    val = open_dataset("imagefolder", root, "val")
    assert class_counts("imagefolder", root, "val")["cat"] == 0 and \
        f"1 class(es) have no images in {root / 'val'}, so their accuracy cannot be measured: cat." in val.notes


def test_files_left_out_and_look_alike_class_names_are_said(tmp_path):
    import unicodedata

    root = make_imagefolder(tmp_path / "pets")
    (root / "cat" / "phone.HEIC").write_bytes(b"\0")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0")  # what a file manager leaves is not mentioned
    shutil.copy(next((root / "cat").glob("cat_0.*")), root / "dog" / "web.jfif")  # a JPEG by another name: used
    for form in ("NFC", "NFD"):
        shutil.copytree(root / "cat", root / unicodedata.normalize(form, "café"))
    train, val = (open_dataset("imagefolder", root, split) for split in ("train", "val"))
    assert root / "dog" / "web.jfif" in train.files + val.files
    left_out = [n for n in train.notes if "are not images ResLens reads" in n]
    assert len(left_out) == 1 and left_out[0].endswith(
        f"and are left out: {len(IMAGEFOLDER_SIZES) + 2} .txt, 3 .heic. Convert HEIC/HEIF photos to JPEG to use them.")
    assert f"Class folders 'cafe\\u0301' and 'caf\\xe9' in {root} look alike" in " ".join(train.notes)


@pytest.mark.parametrize("name, message", [
    (b"caf\xe9", "caf\ufffd has a name that is not UTF-8 text, so ResLens cannot store it; rename it"),
    (b"red\x1b[31m", r"Class folder 'red\\x1b\[31m' in .* has a control character"),
])
def test_class_names_that_cannot_be_stored_or_shown_are_refused_in_one_sentence(tmp_path, name, message):
    import os

    root = make_imagefolder(tmp_path / "pets")
    os.rename(root / "dog", os.path.join(os.fsencode(root), name))
    with pytest.raises(DatasetError, match=message):
        class_counts("imagefolder", root, "train")


@pytest.mark.parametrize("case, error, message", [
    ("none", DatasetError, "needs a root: the folder that holds your images"),
    ("absent", DatasetMissing, "absent does not exist; the root of imagefolder must be"),
    ("a file", DatasetMissing, r"notes.txt is a file, not a folder; the root of imagefolder must be"),
    ("empty", DatasetError, r"needs at least two class folders with images \(none found\): expected one folder"),
    ("one class", DatasetError, r"\(only 'cat' found\)"),
    ("loose images", DatasetError, "5 images lie directly in it, outside any class folder"),
    ("train only", DatasetError, "has a train/ folder of classes but no val/ folder"),
    ("a zip", DatasetMissing, r"set.zip is a .zip file, not a folder: unpack it, or drop it on the Train page"),
    ("empty val", DatasetError, "has no validation images: its val/ folder holds no images of the classes in train/"),
    ("one image each", DatasetError, "has no validation images: every class has a single image, so none is held out"),
    ("capitals", DatasetError, "has Train/ and Val/ folders: name them train/ and val/ \\(lower case\\)"),
    ("one capital", DatasetError, "has train/ and Val/ folders: name them train/ and val/"),
    ("empty train", DatasetError, r"set/train holds no class folders with images"),
])
def test_a_folder_that_is_not_an_image_folder_says_what_layout_is_expected(tmp_path, case, error, message):
    root = {"none": None, "absent": tmp_path / "absent", "a zip": tmp_path / "set.zip",
            "a file": tmp_path / "notes.txt"}.get(case, tmp_path / "set")
    if case == "a file":
        root.write_text("my images are elsewhere")
    elif case == "empty":
        (tmp_path / "set" / "notes").mkdir(parents=True)
    elif case == "one class":
        make_imagefolder(tmp_path / "set", sizes={"cat": 3})
    elif case == "loose images":
        make_imagefolder(tmp_path / "set", sizes={"cat": 5})
        root = tmp_path / "set" / "cat"
    elif case == "train only":
        make_imagefolder(tmp_path / "set", "split")
        shutil.rmtree(tmp_path / "set" / "val")
    elif case == "a zip":
        (tmp_path / "set.zip").write_bytes(b"PK\5\6" + bytes(18))
    elif case == "empty val":
        make_imagefolder(tmp_path / "set", "split")
        shutil.rmtree(tmp_path / "set" / "val")
        (tmp_path / "set" / "val" / "cat").mkdir(parents=True)
    elif case == "one image each":
        make_imagefolder(tmp_path / "set", sizes={"cat": 1, "dog": 1, "emu": 1})
    elif case in ("capitals", "one capital"):
        make_imagefolder(tmp_path / "set", "split")
        for name in ("train", "val") if case == "capitals" else ("val",):
            (tmp_path / "set" / name).rename(tmp_path / "set" / name.capitalize())
    elif case == "empty train":
        make_imagefolder(tmp_path / "set", sizes={"cat": 3, "dog": 3})
        (tmp_path / "set" / "train").mkdir()
        (tmp_path / "set" / "val").mkdir()
    with pytest.raises(error, match=message):
        class_counts("imagefolder", root, "val" if case in ("empty val", "one image each") else "train")


def test_a_folder_that_cannot_be_read_is_named_not_left_out(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "set", sizes={"cat": 3, "dog": 3})
    walk = datasets.os.walk

    def unreadable_dog(folder, onerror=None, **kw):  # as os.walk reports a folder chmod 000 (tests run as root)
        if Path(folder).name == "dog":
            onerror(PermissionError(13, "Permission denied", str(folder)))
            return iter(())
        return walk(folder, onerror=onerror, **kw)

    monkeypatch.setattr(datasets.os, "walk", unreadable_dog)
    with pytest.raises(DatasetError, match=r"Cannot read .*set/dog: permission denied"):
        class_counts("imagefolder", root)


def test_imagefolder_has_nothing_to_download(tmp_path):
    with pytest.raises(DatasetError, match="your own images; there is nothing to download"):
        datasets.download("imagefolder", tmp_path)


# ------------------------------------------------------------------ config and the data report


def _stage(**keys):
    return {"stages": [{"dataset": "imagefolder", **keys}]}


def test_config_needs_the_folder_itself_as_root(tmp_path):
    with pytest.raises(ConfigError, match="stage 1: root is required for dataset imagefolder: the folder"):
        parse_config(_stage(), check_data=False)
    with pytest.raises(ConfigError, match="stage 1: .*absent does not exist"):
        parse_config(_stage(root=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="stage 1: .*needs at least two class folders"):
        parse_config(_stage(root="empty"), base_dir=tmp_path)
    make_imagefolder(tmp_path / "single", sizes={"cat": 1, "dog": 1})
    with pytest.raises(ConfigError, match="stage 1: .*single has no validation images: every class has a single"):
        parse_config(_stage(root="single"), base_dir=tmp_path)  # refused before a run exists, not as a failed run
    make_imagefolder(tmp_path / "pets")
    stage = parse_config(_stage(root="pets", options={"seed": 3}), base_dir=tmp_path).stages[0]
    assert stage.root == str((tmp_path / "pets").resolve())  # relative to the config's folder, not a parent


def test_split_options_of_an_image_folder_are_typed_like_caltechs(tmp_path):
    make_imagefolder(tmp_path / "pets")
    stage = parse_config(_stage(root="pets", options={"val_fraction": 0.25, "seed": 0}), base_dir=tmp_path).stages[0]
    assert stage.options == {"val_fraction": 0.25, "seed": 0}  # a fraction, as the README's example has it
    for options, message in (({"seed": 0.5}, "options.seed must be an integer"),
                             ({"train_per_class": 2.5}, "options.train_per_class must be an integer"),
                             ({"val_fraction": "a fifth"}, "options.val_fraction must be a number"),
                             ({"seed": -1}, r"options.seed must be between 0 and 2147483647, got -1"),
                             ({"val_fraction": 0.1, "train_per_class": 2}, "give val_fraction or train_per_class, "
                                                                           "not both")):
        with pytest.raises(ConfigError, match=message):
            parse_config(_stage(root="pets", options=options), base_dir=tmp_path)


def test_data_report_of_both_layouts(tmp_path, capsys):
    flat, split = make_imagefolder(tmp_path / "flat"), make_imagefolder(tmp_path / "split", "split")
    assert main(["data", "imagefolder", "--root", str(split), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(split.resolve()) and report["class_names"] == CLASSES
    assert report["splits"]["val"]["class_counts"] == IMAGEFOLDER_VAL_SIZES
    assert report["splits"]["train"]["imbalance_ratio"] == 1.67  # cat 5 / owl 3
    assert main(["data", "imagefolder", "--root", str(flat), "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "classes: 3" in out and "note: Split: by a hash of seed/class/file (50% of each class held out" in out
    assert main(["data", "imagefolder"]) == 2
    assert "needs a root" in capsys.readouterr().err


# ------------------------------------------------------------------ Tiny ImageNet's cut wnids.txt


def test_tinyimagenet_wnids_that_disagree_with_train_folders_are_said_once(tmp_path, caplog):
    root = make_tinyimagenet(tmp_path)
    (root / "tiny-imagenet-200" / "wnids.txt").write_text(f"{TINY_WNIDS[0]}\n")  # cut, as in the real copy
    with caplog.at_level(logging.WARNING, logger="reslens.datasets"):
        train = open_dataset("tinyimagenet", root, "train")
        val_counts = class_counts("tinyimagenet", root, "val")
        class_counts("tinyimagenet", root, "train")
    assert train.classes == sorted(TINY_WNIDS)  # the train folders, not the one line of wnids.txt
    assert val_counts == {w: sum(1 for _, v in TINY_VAL if v == w) for w in sorted(TINY_WNIDS)}
    said = [r.getMessage() for r in caplog.records if "wnids.txt" in r.getMessage()]
    assert said == [f"{root / 'tiny-imagenet-200' / 'wnids.txt'} lists 1 classes but "
                    f"{root / 'tiny-imagenet-200' / 'train'} has 3 class folders; ResLens uses the train folders "
                    "as the classes."]
    assert train.notes == said


def test_tinyimagenet_wnids_that_agree_say_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="reslens.datasets"):
        assert open_dataset("tinyimagenet", make_tinyimagenet(tmp_path)).notes == []
    assert not caplog.records


# ------------------------------------------------------------------ a training stage on each layout


def tiny_stage(root) -> dict:
    return {"name": "mine", "arch": "resnet18", "seed": 0, "stages": [{
        "name": "s1", "dataset": "imagefolder", "root": str(root), "epochs": 1, "batch_size": 4, "image_size": 32,
        "lr": 0.01, "warmup_epochs": 0}]}


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_a_stage_trains_on_an_image_folder(tmp_path, layout):
    from tests.test_engine import run_tiny

    root = make_imagefolder(tmp_path / "pets", layout)
    assert run_tiny(tiny_stage(root), name="mine") == "finished"
    store = RunStore()
    assert store.stages("mine")[0]["class_names"] == CLASSES
    result = store.class_results("mine", 0)
    val = class_counts("imagefolder", root, "val")
    assert result["val_counts"] == [val[c] for c in CLASSES] and result["classes"] == CLASSES
    assert all(root in Path(w["source"]).parents for w in store.misclassified("mine", 0))


def test_a_checkpoint_split_by_options_is_evaluated_on_a_train_val_folder(tmp_path):
    """The split options a flat folder was trained with do not apply to a root with its own train/ and val/."""
    from tests.test_engine import run_tiny
    from train.engine import evaluate_checkpoint

    config = tiny_stage(make_imagefolder(tmp_path / "flat"))
    config["stages"][0]["options"] = {"val_fraction": 0.5, "seed": 3}
    assert run_tiny(config, name="opts") == "finished"
    split = make_imagefolder(tmp_path / "split", "split")
    result = evaluate_checkpoint(RunStore().stages("opts")[0]["best_path"], root=str(split), device="cpu")
    assert result.result["val_counts"] == [IMAGEFOLDER_VAL_SIZES[c] for c in CLASSES]
