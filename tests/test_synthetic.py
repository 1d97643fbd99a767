from collections import Counter

import numpy as np
import pytest

from core.synthetic import RAW_SIZE, VARIANTS, ShapesDataset, shapes_class_counts


def test_images_are_deterministic_and_rgb():
    a, b = ShapesDataset("shapes", "val"), ShapesDataset("shapes", "val")
    for i in (0, 7, 123):
        x, y = np.asarray(a.load_raw(i)), np.asarray(b.load_raw(i))
        assert x.shape == (RAW_SIZE, RAW_SIZE, 3) and np.array_equal(x, y)
    assert not np.array_equal(np.asarray(a.load_raw(0)), np.asarray(a.load_raw(1)))


def test_other_seed_gives_other_images():
    a, b = ShapesDataset("shapes", "train", seed=0), ShapesDataset("shapes", "train", seed=1)
    assert not np.array_equal(np.asarray(a.load_raw(0)), np.asarray(b.load_raw(0)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_counts_without_rendering_agree_with_targets(variant):
    for split in ("train", "val"):
        ds = ShapesDataset(variant, split)
        counted = Counter(ds.classes[t] for t in ds.targets)
        assert shapes_class_counts(variant, split) == dict(counted)
        assert all(counted[c] >= 1 for c in ds.classes)  # stratified: every class in every split


def test_long_tail_ratio_is_caltech_like():
    sizes = VARIANTS["shapes-lt"].sizes
    assert sizes == tuple(sorted(sizes, reverse=True))
    assert 20 <= sizes[0] / sizes[-1] <= 30
    assert len(set(VARIANTS["shapes"].sizes)) == 1


def test_box_encloses_the_object():
    ds = ShapesDataset("shapes", "train")
    assert VARIANTS["shapes"].patterns[0] == "solid"  # one flat colour: easy to find
    for i in [i for i, t in enumerate(ds.targets) if t == 0][:12]:
        image = np.asarray(ds.load_raw(i)).astype(int)
        x0, y0, x1, y1 = ds.box(i)
        assert 0 <= x0 < x1 <= RAW_SIZE and 0 <= y0 < y1 <= RAW_SIZE
        assert 8 <= x1 - x0 <= 0.9 * RAW_SIZE and 8 <= y1 - y0 <= 0.9 * RAW_SIZE
        # the object is one flat colour: the most common exact colour inside the box is rarer outside it
        inside = image[y0:y1, x0:x1].reshape(-1, 3)
        colours, counts = np.unique(inside, axis=0, return_counts=True)
        colour = colours[counts.argmax()]
        share_inside = counts.max() / len(inside)
        outside = np.ones(image.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        share_outside = np.all(image[outside] == colour, axis=1).mean()
        assert share_inside > 0.3 and share_outside < 0.02


def test_each_class_has_its_own_texture():
    for variant in VARIANTS.values():
        assert len(set(variant.patterns)) == len(variant.classes)


def test_transform_and_source():
    ds = ShapesDataset("shapes-lt", "val", transform=lambda im: im.size)
    assert ds[0] == ((RAW_SIZE, RAW_SIZE), ds.targets[0])
    assert ds.source(5) == "shapes-lt:val:5"
    with pytest.raises(ValueError, match="Unknown split"):
        ShapesDataset("shapes", "test")
