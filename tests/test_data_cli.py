"""`python -m train data ...` on fixture trees: real figures, JSON, and clear failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

from core.datasets import DATASETS
from core.paths import REPO_ROOT
from tests.data_fixtures import (CALTECH101_SIZES, CIFAR_TEST_LABELS, CIFAR_TRAIN_LABELS, make_caltech101,
                                 make_cifar100, make_imagefolder, make_tinyimagenet,
                                 serve_tinyimagenet_zip)
from train.cli import main


def _data(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_report_of_caltech101(tmp_path, capsys):
    code, out, _ = _data(capsys, "caltech101", "--root", str(make_caltech101(tmp_path)))
    assert code == 0
    assert "classes: 5" in out
    rows = {words[0]: words for words in map(str.split, out.splitlines()) if words[:1] in (["train"], ["val"], ["all"])}
    assert rows["all"][1] == str(sum(n for c, n in CALTECH101_SIZES.items() if c != "BACKGROUND_Google"))
    # the largest class is Faces (6), the smallest yin_yang (1): imbalance 6.00; image 2 of 4 classes is grayscale
    assert rows["all"][2:4] == ["yin_yang", "(1)"] and rows["all"][4:6] == ["Faces", "(6)"]
    assert rows["all"][6:] == ["6.00", "4"]
    assert "not classes: BACKGROUND_Google (2 images); 21 images on disk in all" in out


def test_text_report_columns_line_up_with_wide_and_combining_class_names(tmp_path, capsys):
    """Class names in CJK (two terminal cells a character) or with a combining accent keep the columns in line."""
    import wcwidth

    root = make_imagefolder(tmp_path / "mine", sizes={"猫猫": 9, "cafe\u0301": 4, "dog": 6})
    code, out, _ = _data(capsys, "imagefolder", "--root", str(root))
    assert code == 0
    lines = [line for line in out.splitlines() if line.split()[:1] in (["split"], ["train"], ["val"], ["all"])]
    assert len(lines) == 4 and any("猫猫" in line for line in lines) and any("cafe\u0301" in line for line in lines)
    assert len({wcwidth.width(line) for line in lines}) == 1, out  # fixed-width columns: every row as wide


def test_json_report_of_tinyimagenet(tmp_path, capsys):
    code, out, _ = _data(capsys, "tinyimagenet", "--root", str(make_tinyimagenet(tmp_path)), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["classes"] == 3 and report["class_labels"][0] == "goldfish"
    val = report["splits"]["val"]
    assert val["images"] == 5 and val["largest"] == {"class": "n02123045", "label": "tabby", "count": 3}
    assert val["imbalance_ratio"] == 3.0 and val["grayscale"] == 0
    assert report["splits"]["train"]["grayscale"] == 3  # image 1 of each class is grayscale
    assert report["splits"]["all"]["class_counts"] == {"n01443537": 5, "n01629819": 5, "n02123045": 7}


def test_json_report_of_cifar100_has_no_grayscale_figure(tmp_path, capsys):
    code, out, _ = _data(capsys, "cifar100", "--root", str(make_cifar100(tmp_path)), "--json")
    report = json.loads(out)
    assert code == 0 and report["splits"]["train"]["images"] == len(CIFAR_TRAIN_LABELS)
    assert report["splits"]["val"]["images"] == len(CIFAR_TEST_LABELS)
    assert report["splits"]["train"]["grayscale"] is None


def test_split_options_reach_the_loader(tmp_path, capsys):
    root = str(make_caltech101(tmp_path))
    code, out, _ = _data(capsys, "caltech101", "--root", root, "--json", "--train-per-class", "2")
    assert code == 0 and json.loads(out)["splits"]["train"]["class_counts"]["Faces"] == 2
    code, _, err = _data(capsys, "caltech101", "--root", root, "--include-clutter")
    assert code == 2 and "has no option 'include_clutter'" in err
    code, _, err = _data(capsys, "caltech101", "--root", root, "--val-fraction", "0.3", "--train-per-class", "2")
    assert code == 2 and "Give caltech101 val_fraction or train_per_class, not both" in err


def test_unreadable_image_is_listed(tmp_path, capsys):
    root = make_caltech101(tmp_path)
    (root / "caltech101" / "101_ObjectCategories" / "Faces" / "image_0007.jpg").write_text("oops")
    code, out, _ = _data(capsys, "caltech101", "--root", str(root))
    assert code == 0 and "unreadable images: 1" in out and "image_0007.jpg is not a readable image" in out


def test_images_cut_short_are_listed_and_bytes_after_the_end_are_not(tmp_path, capsys):
    """A truncated image has a readable header: a JPEG, PNG or GIF lacks its end marker, so the report decodes it;
    a BMP or TIFF has no end marker to look for, so it is always decoded. So is an image over the pixel limit
    refused, as the trainer would."""
    from PIL import Image

    from tests.data_fixtures import make_imagefolder

    root = make_imagefolder(tmp_path / "pets")
    jpegs = sorted(p for p in root.rglob("*.jpg") if not p.name.startswith("."))  # hidden ones are not read
    (jpeg, padded), others = jpegs[:2], [sorted(root.rglob(f"*.{ext}"))[0] for ext in ("PNG", "gif", "bmp")]
    for path in (jpeg, *others):
        path.write_bytes(path.read_bytes()[:-40])
    padded.write_bytes(padded.read_bytes() + bytes(64))  # some cameras pad after the end marker: still whole
    big = root / "dog" / "scan.png"
    Image.new("1", (11_000, 10_000)).save(big)  # under Pillow's own bomb limit, over ResLens's 100 megapixels
    code, out, _ = _data(capsys, "imagefolder", "--root", str(root))
    assert code == 0 and "unreadable images: 5" in out, out
    for path in (jpeg, *others):
        assert f"{path} is damaged or truncated" in out
    assert f"{big} declares 11000x10000 pixels, more than the 100 megapixels" in out
    assert str(padded) not in out


def test_a_report_knows_when_a_file_it_refused_was_fixed_in_place(tmp_path):
    from tests.data_fixtures import make_imagefolder
    from train.data_report import outdated, summarize

    root = make_imagefolder(tmp_path / "pets")
    broken, whole = sorted(root.rglob("*.jpg"))[-2:]
    broken.write_bytes(b"")
    (root / "cat" / "gone.jpg").symlink_to(root / "nowhere.jpg")  # a dangling link: unreadable, and stays so
    report = summarize("imagefolder", root, {})
    assert set(report["splits"]["all"]["unreadable_files"]) == {str(broken), str(root / "cat" / "gone.jpg")}
    assert not outdated(report)
    broken.write_bytes(whole.read_bytes())  # fixed in place: no folder changed
    os.utime(broken, (0, 0))  # its old time stamps back (cp -p) do not hide that: the change time is read
    assert outdated(report)
    assert not outdated(summarize("imagefolder", root, {}))


def test_download_flag_fetches_then_reports(tmp_path, capsys, monkeypatch):
    with serve_tinyimagenet_zip(tmp_path / "server") as (url, _):
        monkeypatch.setitem(DATASETS, "tinyimagenet", replace(DATASETS["tinyimagenet"], url=url))
        code, out, err = _data(capsys, "tinyimagenet", "--root", str(tmp_path / "data"), "--download")
    assert code == 0 and "downloading:" in err and "classes: 3" in out


def test_download_progress_in_a_log_is_a_line_per_tenth(capsys):
    """Not on a terminal (a log file, the app's job log), progress is whole lines, not one line redrawn."""
    from train.data_report import _progress_printer

    show = _progress_printer(terminal=False)
    for done in range(0, 1001, 10):
        show(done, 1000)
    lines = capsys.readouterr().err.split("\n")
    assert len(lines) == 12 and lines[-2:] == ["downloading: 1000 bytes of 1000 bytes", ""]


def test_a_root_that_is_a_file_says_so_not_to_download_into_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = _data(capsys, "caltech101", "--root", str(tmp_path / "notes.txt"))
    assert code == 2 and "notes.txt is a file, not a folder; the root of caltech101 is the folder that holds " \
        "caltech101/101_ObjectCategories." in err and "--download" not in err


def test_missing_root_exits_non_zero_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "train", "data", "caltech101", "--root", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    expected = f"python -m train data caltech101 --root {tmp_path / 'none'} --download"
    assert str(tmp_path / "none" / "caltech101" / "101_ObjectCategories") in result.stderr and expected in result.stderr
