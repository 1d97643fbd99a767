"""Do out-of-distribution thresholds depend on the precision they were computed in?

The trainer calibrates a checkpoint's OOD thresholds (core/ood.py) on its validation pass, which runs under the
trainer's autocast (bf16 on GPUs and on CPUs with native bf16); Explain scores an image in fp32. This evaluates
one checkpoint's validation split twice in one run, in fp32 and under bf16 autocast, and prints both sets of
thresholds and the share of validation images (scored in fp32, as Explain scores) whose threshold test the
bf16-computed thresholds decide differently.

    python bench/ood_precision.py CHECKPOINT [--root DATA] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import ood  # noqa: E402
from train import engine  # noqa: E402


def scores(checkpoint: str, root: str | None, batch_size: int, dtype: torch.dtype | None) -> tuple[np.ndarray, ...]:
    """(max softmax probability, logsumexp) of every validation image, one view each, under ``dtype`` autocast."""
    with mock.patch.object(engine, "autocast_dtype", lambda device: dtype):
        preds = engine.evaluate_checkpoint(checkpoint, root=root, flip=False, batch_size=batch_size).predictions
    return preds.view_confidence, preds.logsumexp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--root", help="data root (default: the one the checkpoint was trained on)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    fp32 = scores(args.checkpoint, args.root, args.batch_size, None)
    bf16 = scores(args.checkpoint, args.root, args.batch_size, torch.bfloat16)
    stats = {"fp32": ood.calibrate(*fp32), "bf16": ood.calibrate(*bf16)}
    print("| thresholds from | MSP threshold | energy threshold |\n| --- | --- | --- |")
    for name, s in stats.items():
        print(f"| {name} | {s['msp_threshold']:.4f} | {s['energy_threshold']:.4f} |")
    msp, lse = fp32
    flips = {"msp": (msp < stats["fp32"]["msp_threshold"]) != (msp < stats["bf16"]["msp_threshold"]),
             "energy": (lse < stats["fp32"]["energy_threshold"]) != (lse < stats["bf16"]["energy_threshold"])}
    print(f"\n{msp.size} validation images; per-image score change fp32 -> bf16: MSP max "
          f"{np.abs(msp - bf16[0]).max():.4f}, logsumexp max {np.abs(lse - bf16[1]).max():.4f}")
    for name, flipped in flips.items():
        print(f"{name}: the bf16 threshold decides {flipped.mean():.2%} of the images differently "
              f"({int(flipped.sum())} of {flipped.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
