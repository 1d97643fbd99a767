"""`python -m train lr-find CONFIG`: the learning-rate range test (Smith 2017; fastai's lr_find).

Trains a fresh copy of one stage's model for ``steps`` steps while the learning rate grows
exponentially from ``start`` to ``end``, recording a smoothed training loss at every step; it
stops early once the loss has blown up (4x its best). The suggestion is the rate where the
smoothed loss falls fastest (steepest negative slope against log lr), before its minimum.
Nothing is written to the run store or the runs folder (the image cache is shared, as in training).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.errors import UserError
from train.cli import folder

SMOOTHING = 0.9
BLOW_UP = 4.0


@dataclass
class LRFindResult:
    """Learning rates tried, the smoothed loss at each, and the suggested rate (None if the loss never fell)."""

    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    caveat: str | None = None  # why the rate may not suit the stage as it will train (set when it starts elsewhere)


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The rate of steepest descent of the loss (against log lr), looked for before the loss's minimum."""
    if len(losses) < 3:
        return None
    end = int(np.argmin(losses)) + 1
    if end < 3:
        return None
    slopes = np.gradient(np.asarray(losses[:end]), np.log10(np.asarray(lrs[:end])))
    best = int(np.argmin(slopes))
    return float(lrs[best]) if slopes[best] < 0 else None


MAX_STEPS = 10_000  # a sweep is a quick look before training; 100 steps are usually enough


def lr_range_test(config: Any, stage_index: int = 0, steps: int = 100, start: float = 1e-6, end: float = 1.0,
                  device: str | None = None, on_step: Callable[[int, int], None] | None = None,
                  init: str | None = None) -> LRFindResult:
    """Run the range test on stage ``stage_index`` (from 0) of a validated ``PipelineConfig``, with the stage's
    data, optimizer and loss (class weights, label smoothing). ``init`` (a checkpoint) replaces the stage's own
    init; a stage that starts from the previous stage, given none, starts from scratch and says so (``caveat``)."""
    from core.models import build_model
    from train import distributed as ddp
    from train.engine import autocast_dtype, class_weights, load_stage_data, make_optimizer, set_trainable, \
        trainable_prefixes
    from train.image_cache import Normalizer
    from train.recipe import training_loss

    if not (0 < start < end < math.inf):
        raise UserError(f"The range test needs 0 < start < end, both finite, got start {start:g} and end {end:g}.")
    if not 3 <= steps <= MAX_STEPS:
        raise UserError(f"The range test takes 3 to {MAX_STEPS} steps, got {steps}.")
    stage = config.stages[stage_index]
    ctx = ddp.Dist(0, 1, ddp.pick_device(device))
    data = load_stage_data(stage, ctx)
    torch.manual_seed(config.seed)  # after the cache: building it draws random numbers
    caveat = None
    if init is None and stage.init == "previous":  # the previous stage has not been trained here
        init, caveat = "scratch", (f"stage {stage_index + 1} starts from the previous stage's weights, which this "
                                   "test does not have: it started from scratch, where rates run higher than in a "
                                   "fine-tune; give it the previous stage's best.pt (--init) for the fine-tune's rate")
    model = build_model(config.arch, len(data.classes), init or stage.init, data.classes).to(ctx.device)
    optimizer = make_optimizer(model, stage)
    normalize = Normalizer(data.preprocessing.mean, data.preprocessing.std).to(ctx.device)
    loader = DataLoader(data.train, batch_size=stage.batch_size, shuffle=True, drop_last=len(data.train) > stage.batch_size,
                        num_workers=stage.num_workers, generator=torch.Generator().manual_seed(config.seed))
    amp = autocast_dtype(ctx.device) if config.amp else None
    weights = class_weights(data.train_counts, stage.imbalance, stage.cb_beta)
    criterion = training_loss(weights.to(ctx.device) if weights is not None else None, stage.label_smoothing)
    lrs, losses, average, best = [], [], 0.0, math.inf
    set_trainable(model, trainable_prefixes(stage.train_layers, head_only=False))  # what the stage trains after
    # any head-only freeze_epochs (frozen layers, BatchNorm statistics included, stay as they are)
    batches = iter(loader)
    for i in range(steps):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        lr = start * (end / start) ** (i / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            loss = criterion(model(normalize(images.to(ctx.device))).float(), labels.to(ctx.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = SMOOTHING * average + (1 - SMOOTHING) * float(loss.detach())
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        if not math.isfinite(smoothed) or smoothed > BLOW_UP * best:
            break
        best = min(best, smoothed)
        lrs.append(lr)
        losses.append(smoothed)
        if on_step is not None:
            on_step(i + 1, steps)
    return LRFindResult(lrs, losses, suggest(lrs, losses), caveat)


# ------------------------------------------------------------------ command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("--stage", type=int, default=1, help="which stage's data and model (numbered from 1)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start", type=float, default=1e-6, help="first learning rate")
    p.add_argument("--end", type=float, default=1.0, help="last learning rate")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--data-root", type=folder, help="folder holding the data sets (for stages whose root is null)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--csv", help="also write every (lr, loss) pair to this CSV file")
    p.add_argument("--init", help="start from this checkpoint instead of the stage's init (for a stage with init "
                                  "previous: the previous stage's best.pt)")


def run(args: argparse.Namespace) -> int:
    """Learning-rate range test on one stage: loss against learning rate, and a suggested rate."""
    from pathlib import Path

    from train.config import check_stage_files, load_config

    csv_path = Path(args.csv).expanduser() if args.csv else None
    if csv_path is not None and (csv_path.is_dir() or not csv_path.parent.is_dir()):
        raise UserError(f"--csv: {csv_path} is a folder." if csv_path.is_dir() else
                        f"--csv: folder {csv_path.parent} does not exist.")
    config = load_config(args.config, args.overrides, data_root=args.data_root, check_data=False)
    if not 1 <= args.stage <= len(config.stages):
        raise UserError(f"--stage must be between 1 and {len(config.stages)}, got {args.stage}.")
    check_stage_files(config, args.stage - 1)  # only the stage it reads: another stage's data may be absent
    result = lr_range_test(config, args.stage - 1, args.steps, args.start, args.end, args.device, init=args.init)
    if result.caveat:
        print(f"Note: {result.caveat}.", file=sys.stderr)
    print(f"{'LR':>10}  LOSS (smoothed)")
    for k in range(0, len(result.lrs), max(1, len(result.lrs) // 20)):
        print(f"{result.lrs[k]:>10.2e}  {result.losses[k]:.4f}")
    if csv_path is not None:
        csv_path.write_text("lr,loss\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(result.lrs, result.losses)))
    if result.suggestion is None:
        print("No suggestion: the loss did not fall; try a wider range (--start, --end) or more --steps.")
        return 1
    print(f"Suggested learning rate: {result.suggestion:.2e} (where the smoothed loss falls fastest); "
          f"set it with --set stages.{args.stage}.lr={result.suggestion:.2e}")
    return 0


COMMANDS = {"lr-find": (add_arguments, run)}
