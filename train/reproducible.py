"""Exact resume: randomness that does not depend on where a run was stopped, and the RNG state it saves.

A training sample's augmentation is drawn from its own seed, derived from (pipeline seed, epoch,
position in the epoch's order): ``SeededItems`` runs the dataset's transform under that seed, in
the main process or in any DataLoader worker, so a resumed epoch augments its remaining samples
exactly as the uninterrupted run would have, whatever the number of workers (the batched device path,
train/device_batches.py, seeds each batch with its first sample's seed); MixUp/CutMix draw under a seed of
(pipeline seed, epoch, step, rank), ``batch_seed``, so they too are the same on every rank after a resume.
Everything else that
draws random numbers in the trainer's process (Python, NumPy, torch CPU and CUDA generators) is
captured by ``rng_state`` into the checkpoint and put back by ``set_rng_state`` on resume.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of ``epoch``'s order (a cheap, well-mixed 63-bit hash)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK
    return x ^ (x >> 32)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)`` pairs (``ShardedSampler(seeded=True)`` yields them).

    Each item is produced under ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's
    generator is left untouched.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one rank's training step (MixUp/CutMix draws): the same wherever the run was stopped and on
    whichever rank validates, unlike the process's generators, which only rank 0's checkpoint saves."""
    return sample_seed(seed, epoch, -(1 + step * 1024 + rank))  # negative positions: never a sample's seed


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from the CPU generator under ``seed``, leaving the caller's generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def rng_state() -> dict[str, Any]:
    """Every generator of this process, as plain values a ``weights_only`` checkpoint can hold."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` captured (CUDA generators only when they were saved and exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_mismatch(checkpoint: dict[str, Any], same_config: bool, sampler: dict[str, Any],
                    train_images: str) -> str | None:
    """Why ``checkpoint`` cannot continue this run exactly (its stage config, sample order or training images
    differ) and what to do, or None.

    ``same_config``: whether it was written for this stage's config (``PipelineConfig.written_for``).
    ``sampler`` is the position this run would resume at; only the keys the checkpoint stored are compared.
    ``train_images``: the training split's ``LabeledImages.digest`` now (older checkpoints store none).
    """
    if not same_config:
        return "its checkpoint was written for a different stage configuration; start a new run instead"
    stored = checkpoint.get("sampler") or {}
    keys = ("seed", "n", "world", "epoch", "start") if "n" in stored else ("seed",)  # older files: seed only
    differ = [k for k in keys if k in stored and stored[k] != sampler.get(k)]
    if (checkpoint.get("images") or {}).get("train", train_images) != train_images:
        differ.append("images")
    if "n" in differ or "images" in differ:
        what = (f"{stored['n']} then, {sampler.get('n')} now: images were added or removed" if "n" in differ
                else "as many as then, but images were renamed, replaced or moved to another class")
        return (f"its training images changed since the checkpoint ({what}); put them back as they were and resume, "
                "or start a new run")
    if differ:
        what = ", ".join(f"{k} {stored[k]} (now {sampler.get(k)})" for k in differ)
        return f"its checkpoint's sample order differs ({what}); start a new run instead"
    return None
