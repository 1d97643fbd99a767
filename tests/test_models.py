import re

import pytest
import torch
from PIL import Image

from core.checkpoints import save_checkpoint
from core.models import ModelError, Preprocessing, build_model, imagenet_weights_file


def _payload(model, arch, classes):
    return {"arch": arch, "num_classes": len(classes), "class_names": classes,
            "preprocessing": Preprocessing.for_size(32).to_dict(), "model": model.state_dict()}


def test_scratch_resnet50_has_requested_head():
    model = build_model("resnet50", 7)
    assert model.fc.out_features == 7 and model.fc.in_features == 2048


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ModelError, match="Unknown architecture 'vgg'"):
        build_model("vgg", 3)


def test_checkpoint_init_keeps_backbone_and_replaces_head(tmp_path):
    src = build_model("resnet18", 4)
    path = save_checkpoint(tmp_path / "a.pt", _payload(src, "resnet18", list("abcd")))
    same = build_model("resnet18", 4, path)
    assert torch.equal(same.fc.weight, src.fc.weight)
    same = build_model("resnet18", 4, path, list("abcd"))  # the same classes in the same order: the head stays
    assert torch.equal(same.fc.weight, src.fc.weight)
    for others in (list("abce"), list("dcba")):  # as many classes, other ones or in another order: a new head
        other = build_model("resnet18", 4, path, others)
        assert not torch.equal(other.fc.weight, src.fc.weight)
        assert torch.equal(other.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    new = build_model("resnet18", 9, path)
    assert new.fc.out_features == 9
    assert torch.equal(new.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert torch.equal(new.conv1.weight, src.conv1.weight)


def test_checkpoint_init_of_other_arch_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", _payload(build_model("resnet18", 2), "resnet18", ["x", "y"]))
    with pytest.raises(ModelError, match="holds a resnet18, but a resnet34 was asked for"):
        build_model("resnet34", 2, path)


def test_imagenet_weights_read_from_torchvision_cache(tmp_path, monkeypatch):
    from core import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_check_cached_weights", lambda arch: None)  # stand-in weights: not the published file
    reference = build_model("resnet18", 1000)
    cached = imagenet_weights_file("resnet18")
    assert cached.is_relative_to(tmp_path)
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", 5, "imagenet")
    assert model.fc.out_features == 5
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_cached_imagenet_weights_that_are_not_the_published_file_are_refused_in_one_sentence(tmp_path, monkeypatch):
    """A download cut short, or other weights copied under the name: torch.hub checks the hash only when it
    downloads, so the stage failed with load_state_dict's traceback (or a pickled model was unpickled)."""
    import hashlib

    from core import models
    from train import jobs
    from train.config import ConfigError, parse_config
    from tests.test_engine import tiny_config

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = imagenet_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(build_model("resnet50", 1000).state_dict(), cached)
    said = (f"The cached ImageNet weights {cached} are damaged or are not resnet18's (their checksum does not match "
            "the one in the file name): delete the file and it is downloaded again, or copy the right one there")
    with pytest.raises(ModelError, match=re.escape(said)):
        build_model("resnet18", 5, "imagenet")
    with pytest.raises(ConfigError, match=re.escape(f"stage 1 (s1): {said}")):  # before a run is made
        jobs.check_inits(parse_config(tiny_config(tmp_path, epochs=(1,), init="imagenet")))
    named = cached.with_name(f"resnet18-{hashlib.sha256(cached.read_bytes()).hexdigest()[:8]}.pth")
    monkeypatch.setattr(models, "imagenet_weights_file", lambda arch: named)
    cached.rename(named)
    models._check_cached_weights("resnet18")  # a file whose checksum starts as its name says passes


def test_imagenet_weights_missing_offline_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        build_model("resnet50", 5, "imagenet")
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path) in message


def test_preprocessing_round_trip_and_transform():
    pre = Preprocessing.for_size(64)
    assert pre.resize == 73
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    x = pre.eval_transform()(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert x.shape == (3, 64, 64)
    assert x[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-4)


def test_preprocessing_at_another_size_keeps_the_normalisation():
    pre = Preprocessing(image_size=64, resize=73, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    larger = pre.at_size(80)
    assert (larger.image_size, larger.resize) == (80, 91)
    assert (larger.mean, larger.std) == (pre.mean, pre.std)


def test_crop_box_matches_resize_and_center_crop():
    pre = Preprocessing(image_size=224, resize=256)
    x0, y0, x1, y1 = pre.crop_box(512, 256)  # short side 256 -> scale 1, crop 224 centred
    assert (x0, y0, x1, y1) == pytest.approx((144, 16, 368, 240))


def test_checkpoint_whose_weights_do_not_fit_is_one_sentence(tmp_path):
    from core.checkpoints import CheckpointError

    payload = _payload(build_model("resnet34", 2), "resnet18", ["x", "y"])  # says resnet18, holds resnet34
    path = save_checkpoint(tmp_path / "a.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model("resnet18", 5, path)
