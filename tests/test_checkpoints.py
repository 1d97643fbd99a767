import errno
import os
import re

import pytest
import torch

from core import checkpoints
from core.checkpoints import CheckpointError, load_checkpoint, load_model, save_checkpoint
from core.models import Preprocessing, build_model


def _payload(arch="resnet18", classes=("a", "b", "c")):
    model = build_model(arch, len(classes))
    return {"arch": arch, "num_classes": len(classes), "class_names": list(classes),
            "preprocessing": Preprocessing.for_size(32).to_dict(), "model": model.state_dict(), "epoch": 3}


def test_round_trip_loads_model_in_eval_mode(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", _payload())
    model, info = load_model(path)
    assert not model.training
    assert info.class_names == ["a", "b", "c"] and info.arch == "resnet18" and info.epoch == 3
    assert info.preprocessing == Preprocessing.for_size(32)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(CheckpointError, match="would run code"):
        load_checkpoint(path)
    assert not _Evil.marker.exists()


@pytest.mark.parametrize("content, match", ids=["empty", "bytes", "zip-header"], argvalues=[
    (b"", "empty file"),
    (bytes(range(256)) * 16, "not a readable PyTorch file"),
    (b"PK\x03\x04" + bytes(100), "not a readable PyTorch file"),
])
def test_garbage_files_are_refused(tmp_path, content, match):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_a_legacy_or_safetensors_file_is_named_not_called_corrupt(tmp_path):
    from safetensors.torch import save_file

    legacy, tensors = tmp_path / "old.pt", tmp_path / "w.safetensors"
    torch.save(_payload(), legacy, _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(3)}, tensors)
    with pytest.raises(CheckpointError, match=r"is in PyTorch's legacy format .* save it again with torch\.save"):
        load_checkpoint(legacy)
    with pytest.raises(CheckpointError, match=r"is a safetensors file, not a PyTorch checkpoint"):
        load_checkpoint(tensors)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_bytes_changed_on_disk_are_caught_by_the_checksums_as_zipfile_finds_them(tmp_path):
    import zipfile

    path = save_checkpoint(tmp_path / "x.pt", _payload())
    records = zipfile.ZipFile(path).infolist()
    assert checkpoints.first_damaged_record(path, records) is None
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # a zeroed block inside the weights
    path.write_bytes(data)
    damaged = zipfile.ZipFile(path).testzip()
    assert damaged is not None and checkpoints.first_damaged_record(path, records) == damaged
    with pytest.raises(CheckpointError, match=f"its record {damaged} does not match its checksum"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_reslens_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    weights = build_model("resnet18", 2).state_dict()
    for saved in (weights, {"state_dict": weights}):  # bare, and as training scripts often wrap it
        torch.save(saved, path)
        with pytest.raises(CheckpointError, match=r"holds bare weights \(a state_dict\), not a ResLens checkpoint, "
                                                  r".* or from torchvision's ImageNet weights with init: imagenet\."):
            load_checkpoint(path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"is not a ResLens checkpoint \(missing: format_version, arch"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "FORMAT_VERSION", 99)
    path = save_checkpoint(tmp_path / "new.pt", _payload())
    monkeypatch.setattr(checkpoints, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format version 99, newer"):
        load_checkpoint(path)


def test_other_architecture_or_classes_say_so(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", _payload())
    with pytest.raises(CheckpointError, match="holds a resnet18, but a resnet50 is expected"):
        load_model(path, arch="resnet50")
    with pytest.raises(CheckpointError, match=r"other classes than those expected here \(3 -> 4 classes; added d\)"):
        load_model(path, class_names=["a", "b", "c", "d"])
    with pytest.raises(CheckpointError, match=r"\(3 -> 3 classes; added x; removed c\)"):
        load_model(path, class_names=["a", "b", "x"])


def test_a_class_renamed_to_another_unicode_form_says_so():
    from core.checkpoints import class_change

    nfc, nfd = "caf\u00e9", "cafe\u0301"  # the same name as macOS and Linux may write it
    assert class_change(["bar", nfd], ["bar", nfc]) == (f"2 -> 2 classes; added {nfc}; removed {nfd}; the same names "
                                                        "written in another Unicode form: folders copied between "
                                                        "macOS and Linux?")


def test_class_names_with_commas_are_quoted_in_a_class_change():
    from core.checkpoints import class_change

    assert class_change(["a"], ["a", "grand piano, upright", "cat"]) == (
        "1 -> 3 classes; added 'grand piano, upright', 'cat'")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    payload = _payload()
    payload["model"] = build_model("resnet34", 3).state_dict()
    path = save_checkpoint(tmp_path / "x.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_model(path)


def _set(key, value):
    """A change to a payload: ``key`` may be ``"preprocessing.image_size"``."""
    def change(payload):
        *parents, last = key.split(".")
        target = payload
        for part in parents:
            target = target[part]
        target[last] = value
    return change


@pytest.mark.parametrize("change, match", ids=[
    "huge-image-size", "zero-image-size", "no-resize", "resize-text", "std-zero", "names-a-string",
    "names-numbers", "model-a-list", "classes-text", "extra-a-number"], argvalues=[
    (_set("preprocessing.image_size", 100_000), "image_size 100000 / resize 37 are out of range"),
    (_set("preprocessing.image_size", 0), "out of range"),
    (lambda p: p["preprocessing"].pop("resize"), "whole-number image_size and resize"),
    (_set("preprocessing.resize", "256"), "whole-number image_size and resize"),
    (_set("preprocessing.std", [0.2, 0.0, 0.2]), "std .* must be positive"),
    (_set("class_names", "abc"), "class_names is not a list of names"),
    (_set("class_names", [1, "b", "c"]), "class_names is not a list of names"),
    (_set("model", [1, 2]), "model is not a dictionary of weight tensors"),
    (_set("num_classes", "3"), "num_classes is '3'"),
    (_set("preprocessing.extra", 5), "preprocessing is not a dictionary"),
])
def test_damaged_values_are_refused_in_one_sentence(tmp_path, change, match):
    payload = _payload()
    change(payload)
    path = save_checkpoint(tmp_path / "x.pt", payload)
    with pytest.raises(CheckpointError, match=f"damaged or was not written by ResLens: .*{match}"):
        load_checkpoint(path)


def test_unreadable_ood_thresholds_count_as_none_and_nan_weights_are_refused(tmp_path):
    payload = _payload()
    for broken in ({"msp_threshold": "x"}, {"msp_threshold": float("nan"), "energy_threshold": 1.0,
                                            "msp_quantiles": [0.1, 0.9], "energy_quantiles": [1.0, 2.0]}):
        payload["ood"] = broken
        path = save_checkpoint(tmp_path / "x.pt", payload)
        assert load_model(path)[1].ood is None
    payload["model"]["fc.bias"][1] = float("nan")
    path = save_checkpoint(tmp_path / "x.pt", payload)
    with pytest.raises(CheckpointError, match=r"not numbers \(NaN or infinite, first in fc.bias\)"):
        load_model(path)


def _fail_midway(error):
    real_save = torch.save

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise error

    return broken_save, real_save


@pytest.mark.parametrize("error, match", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (KeyboardInterrupt(), None),
])
def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, error, match):
    path = save_checkpoint(tmp_path / "last.pt", _payload())
    before = path.read_bytes()
    broken, _ = _fail_midway(error)
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError if match else KeyboardInterrupt, match=match):
        save_checkpoint(path, _payload(classes=("x", "y")))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["class_names"] == ["a", "b", "c"]


def test_a_rewritten_checkpoint_keeps_its_permissions_and_a_link_stays_a_link(tmp_path):
    """ood-thresholds rewrites a user's checkpoint: it became a 0600 copy in place of the link."""
    real = save_checkpoint(tmp_path / "model.pt", _payload())
    real.chmod(0o644)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    save_checkpoint(link, {**_payload(), "epoch": 5})
    assert link.is_symlink() and load_checkpoint(real)["epoch"] == 5
    assert real.stat().st_mode & 0o777 == 0o644
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "unmounted" / "drive" / "model.pt")
    save_checkpoint(dangling, _payload())  # replaced, not followed into folders made on the wrong disk
    assert not dangling.is_symlink() and not (tmp_path / "unmounted").exists()


def test_ood_thresholds_refuse_a_read_only_checkpoint_before_evaluating(tmp_path):
    from train.ood_cmd import add_ood_thresholds

    path = save_checkpoint(tmp_path / "model.pt", _payload())
    path.chmod(0o444)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} is read-only, so its thresholds cannot be "
                                              r"stored in it; copy it, or make it writable \(chmod u\+w\)"):
        add_ood_thresholds(path)
