"""Recipe options: MixUp/CutMix, the EMA of weights (with warm-up), test-time flips and the resolution schedule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core import evaluation
from core.checkpoints import load_checkpoint
from tests.test_engine import one_thread, run_tiny, tiny_config  # noqa: F401 - fixture
from train.config import ConfigError, StageConfig, parse_config
from train.recipe import batch_mixer, weight_average


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "both"])
def test_batch_mixer_gives_soft_labels_of_two_classes(mix):
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mixed, soft = batch_mixer(StageConfig(dataset="shapes", mix=mix), 4)(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 4)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert ((soft > 0).sum(1) <= 2).all() and not torch.equal(mixed, images)


def test_mixing_under_a_batch_seed_ignores_the_process_generator():
    """Under torchrun only rank 0 validates, so the ranks' generators drift apart, and a resume restores rank 0's on
    every rank: the mix must come from (seed, epoch, step, rank) alone to resume bit-exactly."""
    from train.reproducible import batch_seed, seeded

    mixer = batch_mixer(StageConfig(name="s", dataset="shapes", mix="both"), 4)
    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % 4
    results = []
    for state in (1, 2):
        torch.manual_seed(state)  # a different generator state each time
        with seeded(batch_seed(0, 3, 17, 1)):
            results.append(mixer(images, labels))
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(state)))  # untouched
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with seeded(batch_seed(0, 3, 17, 0)):
        other_rank = mixer(images, labels)
    with seeded(batch_seed(0, 3, 18, 1)):
        next_step = mixer(images, labels)
    assert not torch.equal(other_rank[0], results[0][0]) and not torch.equal(next_step[0], results[0][0])


def test_no_mixer_when_off():
    assert batch_mixer(StageConfig(dataset="shapes"), 4) is None


def test_ema_warms_up_then_keeps_its_decay():
    model = nn.Linear(1, 1, bias=False)
    ema = weight_average(model, 0.5)
    values = []
    for w in (1.0, 3.0, 5.0, 7.0):
        model.weight.data.fill_(w)
        ema.update_parameters(model)
        values.append(float(ema.module.weight))
    keep1, keep2 = 2 / 11, 3 / 12  # (1 + n) / (10 + n) for n = 1, 2, below the decay 0.5
    v1 = keep1 * 1.0 + (1 - keep1) * 3.0
    v2 = keep2 * v1 + (1 - keep2) * 5.0
    v3 = 0.5 * v2 + 0.5 * 7.0  # n = 3: (4 / 13) ... capped? no: 4/13 < 0.5, so the warm-up still rules
    v3 = (4 / 13) * v2 + (9 / 13) * 7.0
    assert values == pytest.approx([1.0, v1, v2, v3])
    assert weight_average(model, 0.0) is None


class _Asymmetric(nn.Module):
    """Logits that change when the image is mirrored: the mean of the left and right halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[3] // 2
        return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], 1)


def test_flip_averages_the_logits_of_each_image_and_its_mirror():
    images = torch.zeros(2, 3, 4, 4)
    images[0, ..., :2] = 1.0  # image 0: bright left half -> class 0; its mirror says class 1
    images[1, ..., 3] = 4.0  # image 1: bright right column -> class 1 either way? no: mirror -> class 0
    loader = [(images, torch.tensor([0, 1]))]
    plain = evaluation.predict(_Asymmetric(), loader)
    flipped = evaluation.predict(_Asymmetric(), loader, flip=True)
    assert list(plain.predicted) == [0, 1]
    assert flipped.confidence == pytest.approx([0.5, 0.5])  # both halves averaged: a tie, softmax 0.5


def test_config_checks_the_recipe_keys(tmp_path):
    raw = tiny_config(tmp_path, (1,))
    for key, value in (("mix", "blend"), ("mix_alpha", 0), ("mix_alpha", 1e-60), ("ema", 1.0), ("ema", -0.1), ("tta", "yes")):
        bad = {**raw, "stages": [{**raw["stages"][0], key: value}]}
        with pytest.raises(ConfigError, match=key):
            parse_config(bad)


def test_a_stage_with_mixing_ema_and_flips_validates_and_saves_the_average(tmp_path):
    """best.pt and a finished stage's last.pt hold the weights that were validated (the average): evaluating
    last.pt gives the loss its epoch recorded. (A stopped run's last.pt keeps the raw weights and the average in
    trainer_state: tests/test_engine.py resumes one bit-exactly.)"""
    from train.engine import evaluate_checkpoint, stage_dir

    raw = tiny_config(tmp_path, (2,), mix="both", ema=0.9, tta=True)
    assert run_tiny(raw) == "finished"
    config = parse_config(raw)
    last_path = stage_dir("tiny", 0, config.stages[0]) / "last.pt"
    last = load_checkpoint(last_path)
    best = load_checkpoint(stage_dir("tiny", 0, config.stages[0]) / "best.pt")
    assert "trainer_state" not in last  # a finished stage: the weights only
    assert evaluate_checkpoint(last_path).result["loss"] == pytest.approx(last["metrics"]["val_loss"], rel=1e-5)
    if best["epoch"] == last["epoch"]:
        assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
    assert best["stage_config"]["ema"] == 0.9 and best["stage_config"]["tta"] is True


def test_a_checkpoint_with_a_weight_average_is_used_with_the_average(tmp_path):
    """An unfinished last.pt keeps the raw weights (to resume) and the EMA in trainer_state; whoever loads it
    to predict gets the average, which its metrics were measured with."""
    from core.checkpoints import inference_weights, load_model, save_checkpoint
    from core.models import Preprocessing, build_model

    model, average = build_model("resnet18", 3, "scratch"), build_model("resnet18", 3, "scratch")
    ema = {f"module.{k}": v for k, v in average.state_dict().items()} | {"n_averaged": torch.tensor(4)}
    payload = {"arch": "resnet18", "num_classes": 3, "class_names": ["a", "b", "c"],
               "preprocessing": Preprocessing.for_size(32).to_dict(),
               "model": model.state_dict(), "epoch": 1, "trainer_state": {"ema": ema}}
    path = save_checkpoint(tmp_path / "last.pt", payload)
    loaded, _ = load_model(path)
    assert all(torch.equal(v, average.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert inference_weights({**payload, "trainer_state": {"rng": 1}}) is payload["model"]  # no average: the raw
    odd = {**payload, "trainer_state": {"ema": {"module.fc.weight": torch.zeros(1)}}}  # not this model's average
    assert inference_weights(odd) is payload["model"]


def test_resolution_schedule_ramps_in_steps_of_8_then_holds_the_image_size():
    stage = StageConfig(dataset="shapes", epochs=10, image_size=64, train_size_start=48, augment="strong")
    sizes = [stage.train_size(e) for e in range(10)]
    assert sizes[0] == 48 and sizes[-3:] == [64, 64, 64]  # 0.75 of 10 epochs to grow, then the full size
    assert sizes == sorted(sizes) and all(size % 8 == 0 for size in sizes) and len(set(sizes)) == 3
    assert [StageConfig(dataset="shapes", epochs=4, image_size=40).train_size(e) for e in range(4)] == [40] * 4
    odd = StageConfig(dataset="shapes", epochs=10, image_size=100, train_size_start=61, augment="strong")
    assert [odd.train_size(e) for e in range(10)] == [61, 64, 72, 80, 80, 88, 96, 100, 100, 100]  # both ends exact
    whole = StageConfig(dataset="shapes", epochs=4, image_size=96, train_size_start=32, train_size_ramp=1.0)
    assert [whole.train_size(e) for e in range(4)] == [32, 56, 72, 96]  # a ramp over every epoch still ends at 96


def test_config_checks_the_resolution_schedule(tmp_path):
    raw = tiny_config(tmp_path, (4,), augment="strong")
    for change, message in (({"train_size_start": 48}, r"from 16 to image_size \(32\), got 48"),
                            ({"train_size_start": 8}, "from 16 to image_size"),
                            ({"train_size_start": 16, "augment": "light"}, "needs augment: strong"),
                            ({"train_size_ramp": 0}, "train_size_ramp must be > 0"),
                            ({"train_size_start": 16, "epochs": 2, "train_size_ramp": 0.5},
                             r"needs a ramp of at least 2 epochs; train_size_ramp 0.5 of 2 epoch\(s\) gives 1")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**raw, "stages": [{**raw["stages"][0], **change}]})


@pytest.mark.parametrize("data_path, workers", [("workers", 1), ("device", 0)])
def test_a_resolution_schedule_trains_each_epoch_at_its_size_and_validates_at_the_full_size(
        tmp_path, monkeypatch, data_path, workers):
    from train import engine

    seen: list[tuple[bool, int]] = []  # (training?, input size) of every forward pass
    real_build = engine.build_model

    def recording(*args):
        model = real_build(*args)
        model.register_forward_pre_hook(lambda m, inputs: seen.append((m.training, inputs[0].shape[-1])))
        return model

    monkeypatch.setattr(engine, "build_model", recording)
    raw = tiny_config(tmp_path, (3,), augment="strong", num_workers=workers, train_size_start=24,
                      train_size_ramp=1.0, image_size=40)
    raw["data_path"] = data_path
    assert run_tiny(raw) == "finished"
    per_epoch = len(seen) // 3
    trained = [sorted({size for training, size in seen[e * per_epoch:(e + 1) * per_epoch] if training})
               for e in range(3)]
    assert trained == [[24], [32], [40]]  # 24 + (40 - 24) * epoch / 2, to a multiple of 8
    assert {size for training, size in seen if not training} == {40}


def test_an_older_checkpoint_without_a_newer_stage_key_still_counts_as_this_stage():
    """A key added to StageConfig since a checkpoint was written changes the stage hash, not the stage."""
    config = parse_config({"name": "p", "arch": "resnet18", "stages": [{"dataset": "shapes", "lr": 0.05}]})
    stored = config.stages[0].to_dict()
    older = {k: v for k, v in stored.items() if k not in ("train_size_start", "train_size_ramp")}
    checkpoint = {"config_hash": "written-before", "arch": "resnet18", "stage_config": older}
    assert config.written_for(0, {"config_hash": config.stage_hash(0)})
    assert config.written_for(0, checkpoint)
    assert not config.written_for(0, {**checkpoint, "stage_config": {**older, "lr": 0.1}})
    assert not config.written_for(0, {**checkpoint, "stage_config": {**older, "gone_key": 1}})
    assert not config.written_for(0, {**checkpoint, "arch": "resnet50"})
    assert not config.written_for(0, {**checkpoint, "stage_config": {**older, "train_size_start": 32}})


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_weighs_soft_targets_as_it_weighs_hard_labels(weighted, smoothing):
    from torch import nn
    from torch.nn import functional as F

    from train.recipe import training_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.tensor([0, 0, 0, 1, 1, 2, 3, 4])
    weight = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0]) if weighted else None
    loss = training_loss(weight, smoothing)
    library = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
    assert torch.allclose(loss(logits, labels), library(logits, labels))  # hard labels: the library's own loss
    assert torch.allclose(loss(logits, F.one_hot(labels, 5).float()), library(logits, labels))  # one-hot = hard
    lam = 0.7  # a MixUp pair: the mixed loss is the mix of the two hard losses, each weighed by its classes
    partner = labels.roll(1)
    mixed = lam * F.one_hot(labels, 5).float() + (1 - lam) * F.one_hot(partner, 5).float()
    w = weight if weighted else torch.ones(5)
    w_a, w_b = lam * w[labels].sum(), (1 - lam) * w[partner].sum()
    expected = (w_a * library(logits, labels) + w_b * library(logits, partner)) / (w_a + w_b)
    assert torch.allclose(loss(logits, mixed), expected)
    assert torch.allclose(library(logits, mixed), expected) != weighted  # what nn.CrossEntropyLoss gets wrong
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer calls it: the weighing stays in fp32
        assert torch.allclose(loss(logits, mixed), expected, rtol=1e-6)
