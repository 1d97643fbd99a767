import io

import numpy as np
import pytest
from PIL import Image

from core.images import ImageError
from core.datasets import DatasetError
from core.samples import builtin_samples, load_source, missing_files
from core.synthetic import ShapesDataset


def test_builtin_samples_cover_every_class_once_as_png():
    samples = builtin_samples("shapes-lt")
    classes = [s.true_class for s in samples]
    assert len(classes) == len(set(classes))  # once each
    assert set(classes) == set(ShapesDataset("shapes-lt", "val").classes)
    image = Image.open(io.BytesIO(samples[0].png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert samples[0].filename.endswith(".png") and " " not in samples[0].filename and ":" not in samples[0].filename


def test_load_source_reads_synthetic_sources_and_files(tmp_path):
    expected = np.asarray(ShapesDataset("shapes-lt", "val").load_raw(3))
    assert np.array_equal(np.asarray(load_source("shapes-lt:val:3")), expected)
    path = tmp_path / "x.png"
    Image.new("L", (5, 4), 200).save(path)
    assert load_source(str(path)).mode == "RGB" and load_source(str(path)).size == (5, 4)


def test_load_source_of_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ImageError):
        load_source(str(tmp_path / "gone.jpg"))


def test_a_source_past_the_end_of_its_split_and_moved_files_are_named(tmp_path):
    size = len(ShapesDataset("shapes-lt", "val"))
    with pytest.raises(DatasetError, match=f"names image 99999 of the shapes-lt val split, which has {size} images"):
        load_source("shapes-lt:val:99999")
    kept = tmp_path / "kept.png"
    Image.new("RGB", (4, 4)).save(kept)
    gone = str(tmp_path / "cat" / "gone.png")
    assert missing_files(["shapes-lt:val:99999", str(kept), gone]) == [gone]  # files only; data sets say it later
