"""Batch-wise augmentation (train/device_batches.py) against the per-sample path it replaces on the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from tests.test_engine import one_thread  # noqa: F401 - autouse: one intra-op thread on a shared machine
from train import device_batches
from train.device_batches import (
    DeviceBatches,
    HostGather,
    PixelStore,
    augment_batch,
    color_jitter,
    crop_boxes,
    crop_flip,
    jitter_params,
    resized_crop_boxes,
    resized_crop_flip,
    use_device_path,
)
from train.distributed import ShardedSampler
from train.image_cache import CachedImages, augmentation

SOURCE, SIZE, DRAWS = 40, 32, 1500


def noise(n: int, source: int = SOURCE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, source, source), dtype=torch.uint8, generator=g)


def coordinates(source: int = SOURCE, dtype: torch.dtype = torch.float32, offset: float = 0.5) -> torch.Tensor:
    """A (3, S, S) image whose channel 0 holds each pixel's row, channel 1 its column (+ ``offset``)."""
    ys, xs = torch.meshgrid(torch.arange(source), torch.arange(source), indexing="ij")
    return torch.stack([ys + offset, xs + offset, torch.zeros_like(ys)]).to(dtype)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a, cdf_b = (np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b))
    return float(np.abs(cdf_a - cdf_b).max())


KS_LIMIT = 1.95 * np.sqrt(2 / DRAWS)  # the 0.1% critical value: same distributions stay far below it


def test_crop_flip_equals_torchvision_per_image():
    pixels = noise(4)
    boxes = crop_boxes(6, SOURCE, SIZE, torch.Generator().manual_seed(3))
    rows = torch.tensor([0, 3, 1, 1, 2, 0])
    out = crop_flip(pixels, rows, boxes, SIZE)
    assert out.shape == (6, 3, SIZE, SIZE) and out.dtype == torch.uint8
    assert boxes.flip.any() and not boxes.flip.all()
    for k, row in enumerate(rows.tolist()):
        ref = F.crop(pixels[row], int(boxes.top[k]), int(boxes.left[k]), SIZE, SIZE)
        assert torch.equal(out[k], F.horizontal_flip(ref) if boxes.flip[k] else ref)


def test_centre_crop_equals_the_per_sample_evaluation_crop():
    pixels = noise(3, source=37)  # odd room: torchvision's rounding of the offset
    out = augment_batch(pixels, torch.tensor([2, 0]), "none", SIZE, None)
    expected = augmentation("none", SIZE)
    assert torch.equal(out, torch.stack([expected(pixels[2]), expected(pixels[0])]))


def test_resized_crop_matches_torchvision_antialiased_resize():
    smooth = F.gaussian_blur(noise(2).float(), [7, 7], [2.0, 2.0])
    boxes = resized_crop_boxes(8, SOURCE, torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    out = resized_crop_flip(smooth[rows], boxes, SIZE)
    for k, row in enumerate(rows.tolist()):
        ref = F.resized_crop(smooth[row], int(boxes.top[k]), int(boxes.left[k]), int(boxes.height[k]),
                             int(boxes.width[k]), [SIZE, SIZE], antialias=True)
        ref = F.horizontal_flip(ref) if boxes.flip[k] else ref
        assert (out[k] - ref).abs().mean() < 1.0  # grey levels of 255: the same picture, resampled alike


def test_colour_jitter_equals_torchvision_in_each_images_order():
    batch = noise(6).float()
    jitter = jitter_params(6, torch.Generator().manual_seed(2))
    out = color_jitter(batch, jitter)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    assert len({tuple(o) for o in jitter.order.tolist()}) > 1
    for k in range(6):
        ref = batch[k] / 255
        for which in jitter.order[k].tolist():
            ref = adjust[which](ref, float(jitter.factors[k, which]))
        assert torch.allclose(out[k] / 255, ref, atol=1e-5)


def light_boxes(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Top, left and flip of crops of the uint8 ``coordinates`` image, read back from their pixels."""
    first, second = images[:, 1, 0, 0].long(), images[:, 1, 0, 1].long()
    flip = second < first
    return {"top": images[:, 0, 0, 0].numpy(), "left": torch.where(flip, first - SIZE + 1, first).numpy(),
            "flip": flip.numpy()}


def test_light_augmentation_has_the_per_sample_statistics():
    image = coordinates(dtype=torch.uint8, offset=0)
    per_sample = augmentation("light", SIZE)
    torch.manual_seed(0)
    reference = light_boxes(torch.stack([per_sample(image) for _ in range(DRAWS)]))
    batched = light_boxes(augment_batch(image[None], torch.zeros(DRAWS, dtype=torch.long), "light", SIZE,
                                        torch.Generator().manual_seed(1)))
    for key in ("top", "left"):
        assert set(reference[key]) == set(batched[key]) == set(range(SOURCE - SIZE + 1))
        assert ks_distance(reference[key], batched[key]) < KS_LIMIT, key
    assert abs(reference["flip"].mean() - batched["flip"].mean()) < 0.06


def resized_boxes(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Scale, aspect ratio, centre and flip of resized crops of the float ``coordinates`` image."""
    a, b = SIZE // 4, 3 * SIZE // 4  # interior rows/columns: the ramp there is exactly linear
    h = ((images[:, 0, b, 0] - images[:, 0, a, 0]) * SIZE / (b - a)).round()
    dx = (images[:, 1, 0, b] - images[:, 1, 0, a]) * SIZE / (b - a)
    w = dx.abs().round()
    top = (images[:, 0, a, 0] - (a + 0.5) * h / SIZE).round()
    x_a = torch.where(dx < 0, images[:, 1, 0, SIZE - 1 - a], images[:, 1, 0, a])
    left = (x_a - (a + 0.5) * w / SIZE).round()  # boxes are whole pixels: rounding removes resampling noise
    return {"scale": (h * w / SOURCE ** 2).numpy(), "log_ratio": torch.log(w / h).numpy(),
            "centre_y": ((top + h / 2) / SOURCE).numpy(), "centre_x": ((left + w / 2) / SOURCE).numpy(),
            "flip": (dx < 0).numpy()}


def test_resized_crop_has_the_per_sample_statistics():
    image = coordinates()
    crop, flip = augmentation("strong", SIZE).transforms[:2]  # RandomResizedCrop, RandomHorizontalFlip
    torch.manual_seed(0)
    reference = resized_boxes(torch.stack([flip(crop(image)) for _ in range(DRAWS)]))
    boxes = resized_crop_boxes(DRAWS, SOURCE, torch.Generator().manual_seed(1))
    batched = resized_boxes(resized_crop_flip(image[None].expand(DRAWS, -1, -1, -1), boxes, SIZE))
    for key in ("scale", "log_ratio", "centre_y", "centre_x"):
        assert ks_distance(reference[key], batched[key]) < KS_LIMIT, key
    assert 0.24 < batched["scale"].min() and batched["scale"].max() < 1.01
    assert abs(reference["flip"].mean() - batched["flip"].mean()) < 0.06


def test_strong_batches_are_float_in_range_and_repeat_with_their_seed():
    pixels = noise(5)
    rows = torch.tensor([4, 0, 2])
    a = augment_batch(pixels, rows, "strong", SIZE, torch.Generator().manual_seed(9))
    b = augment_batch(pixels, rows, "strong", SIZE, torch.Generator().manual_seed(9))
    c = augment_batch(pixels, rows, "strong", SIZE, torch.Generator().manual_seed(10))
    assert a.shape == (3, 3, SIZE, SIZE) and a.is_floating_point()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 255


def cached_images(tmp_path, n: int = 10) -> CachedImages:
    path = tmp_path / "pixels.npy"
    np.save(path, noise(n + 1).numpy())
    targets = [i % 3 for i in range(n + 1)]
    rows = [i for i in range(n + 1) if i != 4]  # one skipped unreadable row
    return CachedImages(path, targets, augmentation("none", SIZE), rows)


def test_validation_batches_equal_the_per_sample_items(tmp_path):
    images = cached_images(tmp_path)
    batches = DeviceBatches(images, "none", SIZE, 4, torch.device("cpu"))
    assert len(batches) == 3  # 10 items, the last batch partial
    got = list(batches)
    assert [len(x) for x, _ in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in got]), torch.stack([images[i][0] for i in range(len(images))]))
    assert torch.cat([y for _, y in got]).tolist() == images.targets


@pytest.mark.parametrize("kind", ["light", "strong"])
def test_a_resumed_epoch_draws_the_same_remaining_batches(tmp_path, kind):
    images = cached_images(tmp_path)
    sampler = ShardedSampler(len(images), seed=5, seeded=True)
    batches = DeviceBatches(images, kind, SIZE, 3, torch.device("cpu"), sampler, drop_last=True)
    sampler.set_epoch(2)
    whole = list(batches)
    assert len(whole) == 3
    sampler.set_epoch(2, start=3)  # stopped after the first batch
    rest = list(batches)
    assert len(rest) == 2
    for (x, y), (x2, y2) in zip(whole[1:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    sampler.set_epoch(3)
    assert not torch.equal(list(batches)[1][0], whole[1][0])  # another epoch, other draws


def test_each_batch_is_seeded_with_its_first_samples_seed_hashed_once(tmp_path, monkeypatch):
    """A batch's draws come from the seed the per-sample path gives its first sample, and only that one is hashed."""
    import train.reproducible

    images = cached_images(tmp_path)
    sampler = ShardedSampler(len(images), seed=5, rank=1, world=2, seeded=True)
    sampler.set_epoch(2, start=1)  # resumed after one batch of 1: four samples of this rank's five remain
    pairs = list(sampler)
    hashes, seeded = [], []
    real_hash, real_batch = train.reproducible.sample_seed, PixelStore.batch
    monkeypatch.setattr(train.reproducible, "sample_seed", lambda *a: hashes.append(a) or real_hash(*a))

    def batch(store, indices, kind, size, g):
        seeded.append((list(indices), g.initial_seed()))
        return real_batch(store, indices, kind, size, g)

    monkeypatch.setattr(PixelStore, "batch", batch)
    assert len(list(DeviceBatches(images, "light", SIZE, 2, torch.device("cpu"), sampler))) == 2
    assert seeded == [([i for i, _ in pairs[k:k + 2]], pairs[k][1]) for k in (0, 2)]
    assert len(hashes) == 2


def batch_pairs(tmp_path, kind: str, device: str, monkeypatch=None):
    """The same epoch as CPU-held batches and as batches on ``device`` (with ``monkeypatch``: the cache does not
    fit there, so its rows are gathered on the host and copied over)."""
    images = cached_images(tmp_path)
    sampler = ShardedSampler(len(images), seed=1, seeded=True)
    reference = DeviceBatches(images, kind, SIZE, 4, torch.device("cpu"), sampler)
    if monkeypatch is not None:
        monkeypatch.setattr(device_batches, "_fits", lambda nbytes, device: False)
    other = DeviceBatches(images, kind, SIZE, 4, torch.device(device), sampler)
    return list(zip(reference, other, strict=True)), other.store


@pytest.mark.parametrize("kind", ["none", "light", "strong"])
def test_rows_gathered_on_the_host_give_the_same_batches(tmp_path, kind, monkeypatch):
    """A cache too large for the GPU is gathered on the host and copied over: the same batches as when held."""
    pairs, store = batch_pairs(tmp_path, kind, "cpu", monkeypatch)  # what a GPU without room for the cache does
    assert store.copied and len(pairs) == 3  # batches of 4, 4, 2: the third refills the first one's buffer
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in pairs)


def test_the_host_gather_writes_each_batch_straight_into_one_of_two_buffers():
    """One copy per batch on the host: rows land in a reused buffer (pinned on a GPU machine), nothing else allocated."""
    pixels = noise(12)
    gather = HostGather(pixels, torch.device("cpu"))
    rows = [torch.tensor(r) for r in ([3, 0, 7, 7], [11, 2, 5, 1], [4, 6, 8, 9], [10, 0])]
    first = [gather.fill(r) for r in rows[:2]]
    assert first[0].data_ptr() != first[1].data_ptr()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        again = [gather.fill(r) for r in rows[2:]]
    assert sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) < pixels[0].nbytes
    assert [a.data_ptr() for a in again] == [f.data_ptr() for f in first]  # the two buffers in turn
    assert all(torch.equal(a, pixels[r]) for a, r in zip(again, rows[2:]))
    batch = gather.gather(rows[0])
    assert torch.equal(batch, pixels[rows[0]]) and batch.data_ptr() not in {f.data_ptr() for f in first}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["none", "light", "strong"])
@pytest.mark.parametrize("held", [True, False], ids=["held", "host-gathered"])
def test_cuda_batches_equal_the_cpu_ones(tmp_path, kind, held, monkeypatch):
    """The same draws on the GPU (cache held there, or gathered on the host into pinned buffers reused while
    earlier copies may still run) as on the CPU: equal crops, the same resampling within rounding. The GPU is kept
    busy (``torch.cuda._sleep``) before each host-gathered copy, so a buffer refilled before its copy ran (a
    missing wait on its event) would show as wrong pixels."""
    real_gather = HostGather.gather

    def delayed(self, rows):
        torch.cuda._sleep(10 ** 8)  # about 50 ms of GPU time queued ahead of this batch's copy
        return real_gather(self, rows)

    monkeypatch.setattr(HostGather, "gather", delayed)
    pairs, store = batch_pairs(tmp_path, kind, "cuda", None if held else monkeypatch)
    assert store.copied != held and store.pixels.is_cuda == held
    assert held or store.host_gather.buffers[0].is_pinned()
    for (x, y), (x2, y2) in pairs:
        assert x2.is_cuda and torch.equal(y, y2.cpu())
        assert torch.allclose(x.float(), x2.cpu().float(), atol=0.05 if kind == "strong" else 0)


def test_auto_means_the_device_path_on_cuda_only():
    assert use_device_path("auto", torch.device("cuda", 0)) and not use_device_path("auto", torch.device("cpu"))
    assert use_device_path("device", torch.device("cpu")) and not use_device_path("workers", torch.device("cuda"))
