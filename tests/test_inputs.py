"""Issue 11: FIFOs, zip bombs and files that are not checkpoints are refused with one sentence, at once."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from core.datasets import DatasetError, open_dataset
from core.images import ImageError, load_image
from core.models import Preprocessing
from core.samples import load_source
from tests.data_fixtures import make_cifar100, write_jpeg
from train.cli import main

pytestmark = pytest.mark.timeout(60, method="signal")  # today's code blocks forever on a FIFO


def _small_checkpoint(path: Path) -> Path:
    """A ResLens checkpoint whose 'model' is a tiny state dict (enough for load_checkpoint)."""
    return save_checkpoint(path, {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"],
                                  "preprocessing": Preprocessing.for_size(32).to_dict(),
                                  "model": {"w": torch.ones(4)}})


def test_a_fifo_is_not_an_image(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"x\.jpg is not a regular file"):
        load_image(fifo)
    with pytest.raises(ImageError, match=r"x\.jpg is not a regular file"):  # the app's path (misclassified samples)
        load_source(str(fifo))


def test_explain_refuses_a_fifo_image_and_writes_the_others(tmp_path, capsys):
    from core.models import build_model

    checkpoint = save_checkpoint(tmp_path / "m.pt", {
        "arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"],
        "preprocessing": Preprocessing.for_size(32).to_dict(), "model": build_model("resnet18", 2).state_dict()})
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    good = write_jpeg(tmp_path / "good.jpg", 1)
    status = main(["explain", str(checkpoint), str(fifo), str(good), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "x.jpg is not a regular file" in err and "Traceback" not in err
    assert list((tmp_path / "out").glob("good_*.png"))  # named <image>_<layer>_<method>_<class>.png


def test_a_fifo_is_not_a_checkpoint(tmp_path, capsys):
    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(fifo)
    assert main(["explain", str(fifo), str(write_jpeg(tmp_path / "a.jpg", 1)), "--out", str(tmp_path / "o")]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_a_fifo_inside_a_data_set_is_refused(tmp_path):
    root = make_cifar100(tmp_path)
    (root / "cifar-100-python" / "train").unlink()
    os.mkfifo(root / "cifar-100-python" / "train")
    with pytest.raises(DatasetError, match="train is not a regular file"):
        open_dataset("cifar100", root, "train")


@pytest.mark.parametrize("content", [b"hello", b"{}", b"abc\n", b"PK"], ids=["text", "json", "line", "pk"])
def test_files_that_are_not_zip_archives_are_checkpoint_errors(tmp_path, content, capsys):
    text = tmp_path / "notes.txt"
    text.write_bytes(content)
    link = tmp_path / "best.pt"
    link.symlink_to(text)
    with pytest.raises(CheckpointError, match="is not a readable PyTorch file"):
        load_checkpoint(link)
    assert main(["eval", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint") and err.count("\n") == 1


BOMB_LOADER = textwrap.dedent("""
    import resource, sys
    from core.checkpoints import CheckpointError, load_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_checkpoint(sys.argv[1])
    except CheckpointError as exc:
        print(exc)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, "MB")
""")


@pytest.mark.timeout(300, method="signal")  # deflating 256 MB takes 10 s idle, over 30 s on a loaded machine
def test_a_compressed_record_is_refused_before_it_is_unpacked(tmp_path):
    source = _small_checkpoint(tmp_path / "small.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(bomb, "w") as new:
        for info in old.infolist():
            if info.filename.endswith("/data/0"):
                packed = zipfile.ZipInfo(info.filename)
                packed.compress_type = zipfile.ZIP_DEFLATED
                with new.open(packed, "w", force_zip64=True) as record:
                    chunk = bytes(1 << 20)
                    for _ in range(256):  # 256 MB of zeros in a file of about half a megabyte
                        record.write(chunk)
            else:
                new.writestr(info, old.read(info.filename))
    assert bomb.stat().st_size < 4 << 20
    done = subprocess.run([sys.executable, "-c", BOMB_LOADER, str(bomb)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    message, growth = done.stdout.strip().splitlines()
    assert "is compressed, which PyTorch never writes" in message, done.stdout + done.stderr
    assert int(growth.split()[0]) < 128, growth  # refused from the zip directory, not after unpacking
