"""Recipe ablations on the real Caltech-101: which training options earn their place?

Each variant is the study's final Caltech-101 stage (``train/configs/caltech101-scratch.yaml`` at the study's
``--scale``), started from the same pretrained checkpoint (by default the Tiny ImageNet stage of the study's
``study-<scale>-tiny`` run), with one option changed:

- ``base``: the shipped recipe (label smoothing 0.1, strong augmentation, class-balanced loss);
- ``mix``: MixUp or CutMix on each batch (``mix: both``);
- ``ema``: an exponential moving average of the weights, validated and kept as best (``ema: 0.998``);
- ``no-ls``: no label smoothing;
- ``lr-x2``: twice the learning rate;
- ``res-ramp``: a resolution schedule: training grows from 3/4 of the image size to the full size over the first
  3/4 of the epochs (``train_size_start``), validation at the full size throughout;
- ``bs-half`` / ``bs-x2``: half / twice the batch size, with the learning rate scaled in proportion;
- ``epochs-x2``: twice the epochs and warm-up epochs (the same schedule, stretched);
- ``size-x1.25``: training and validation at 1.25 times the image size (96 -> 120 px at the GPU scale).

``--init scratch`` trains every variant from scratch instead (runs named ``ablate-<scale>-scratch-<variant>``):
that is how the from-scratch recipe is tuned, e.g. on a GPU
``--scale gpu --init scratch --variants base,mix,epochs-x2,size-x1.25``.

Test-time flips (``tta``) and the test resolution need no training: each finished variant's ``best.pt`` (the
weights it validated best, the averaged ones for ``ema``) is evaluated on the validation split without and with
flips in this run, and with ``--test-sizes`` also at other test resolutions (with flips), in a second table.

Runs are trained exactly as a user would (``python -m train run ... --set``); a finished run is reused.

    python bench/recipe_ablation.py --scale cpu --epochs 10 --data-root data --home /tmp/study
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from core.run_store import RunStore  # noqa: E402
from study import (DEFAULT_HOME, SCALES, Outcome, check_before_training, positive_int, summarize,  # noqa: E402
                   train_or_reuse)

CONFIG = "train/configs/caltech101-scratch.yaml"  # its one stage is the study's final Caltech-101 stage
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "mix": {"mix": "both"},
    "ema": {"ema": 0.998},
    "no-ls": {"label_smoothing": 0.0},
    "lr-x2": {"lr": "2x"},
    "res-ramp": {"train_size_start": "0.75x image_size"},
    "bs-half": {"batch_size": "0.5x", "lr": "0.5x"},
    "bs-x2": {"batch_size": "2x", "lr": "2x"},
    "epochs-x2": {"epochs": "2x", "warmup_epochs": "2x"},
    "size-x1.25": {"image_size": "1.25x"},
}
SCRATCH = "scratch"  # --init scratch: no pretrained checkpoint
SCALED = re.compile(r"(?P<factor>\d+(?:\.\d+)?)x(?: (?P<of>\w+))?")  # "2x": of the key itself; "0.75x image_size"


def scaled(value: Any, key: str, values: dict[str, Any]) -> Any:
    """A variant's value: "2x" = twice the stage's value of ``key``, "0.75x image_size" = of another key (the
    scale's value, else the shipped config's)."""
    found = SCALED.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        return value
    of = found["of"] or key
    result = float(found["factor"]) * float(values.get(of, _shipped_stage()[of]))
    return int(round(result)) if isinstance(_shipped_stage()[key], int) else result


@functools.cache
def _shipped_stage() -> dict[str, Any]:
    from train.config import load_config

    return load_config(REPO / CONFIG, check_data=False).stages[0].to_dict()


def settings(variant: str, scale: str, epochs: int | None, init: Path | str) -> dict[str, Any]:
    """The final stage's overrides: the study's scale, the init (a checkpoint or "scratch"), then the variant's
    change."""
    # epochs validate without flips (as the first variants were run); the flip columns evaluate best.pt both ways
    values = {**SCALES[scale].get("caltech101", {}), "init": str(init), "tta": False}
    if epochs:
        values["epochs"] = epochs
    for key, value in VARIANTS[variant].items():
        values[key] = scaled(value, key, values)
    return values


def train_variant(variant: str, args: argparse.Namespace, store: RunStore) -> Outcome:
    sets = [x for key, value in settings(variant, args.scale, args.epochs, args.init).items()
            for x in ("--set", f"stages.caltech101.{key}={json.dumps(value)}")]
    run_args = [CONFIG, "--data-root", str(args.data_root), *sets]
    return train_or_reuse(variant, run_name(variant, args), run_args, args, store)


def run_name(variant: str, args: argparse.Namespace) -> str:
    """``ablate-<scale>-<variant>``, with ``scratch-`` before the variant for runs without a pretrained init."""
    return f"ablate-{args.scale}-{'scratch-' if args.init == SCRATCH else ''}{variant}"


def figures(run: str, args: argparse.Namespace, flip: bool, image_size: int | None = None) -> tuple[float, float]:
    """(acc, balanced) of the run's best.pt on the validation split (``image_size``: the test resolution)."""
    from train.engine import evaluate_checkpoint

    path = args.home / "runs" / run / "stage1-caltech101" / "best.pt"
    result = evaluate_checkpoint(path, root=str(args.data_root), flip=flip, image_size=image_size).result
    return result["accuracy"], result["balanced_acc"]


def size_table(runs: dict[str, str], sizes: list[int], args: argparse.Namespace) -> list[str]:
    """Accuracy / balanced accuracy (with flips) of each variant's best.pt at each test resolution."""
    lines = ["", "Test resolution (best.pt, with flips; accuracy / balanced accuracy):", "",
             "| variant | " + " | ".join(f"{size} px" for size in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for variant, run in runs.items():
        cells = [figures(run, args, True, size) for size in sizes]
        lines.append(f"| {variant} | " + " | ".join(f"{a:.1%} / {b:.1%}" for a, b in cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--epochs", type=positive_int, help="epochs of the Caltech-101 stage (default: the scale's)")
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="the study's ResLens home, whose runs are reused (default: %(default)s)")
    parser.add_argument("--init", help="pretrained checkpoint, or 'scratch' (default: the study's Tiny ImageNet "
                        "stage)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--test-sizes", default="", help="also test each best.pt at these resolutions, e.g. 64,80,96")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.home, args.data_root = args.home.resolve(), args.data_root.resolve()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    try:
        sizes = [positive_int(size) for size in args.test_sizes.split(",") if size.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"--test-sizes {args.test_sizes!r}: {exc}")
    check_before_training(parser, args)
    if args.init != SCRATCH:
        args.init = Path(args.init or args.home / "runs" / f"study-{args.scale}-tiny" / "stage1-tinyimagenet"
                         / "best.pt").resolve()
        if not args.init.is_file():
            parser.error(f"no pretrained checkpoint at {args.init}; run bench/study.py --pipelines tiny first")
    os.environ["RESLENS_HOME"] = str(args.home)
    store = RunStore(args.home / "reslens.sqlite")
    start = "from scratch" if args.init == SCRATCH else f"from `{args.init.name}` of the Tiny ImageNet stage"
    lines = [f"Scale `{args.scale}`, Caltech-101 stage {start}; validation split (1,736 images, 101 classes).", "",
             "| variant | change | acc (last epoch) | balanced (last epoch) | best.pt acc | best.pt acc, flips | "
             "best.pt balanced | best.pt balanced, flips | stage time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    runs: dict[str, str] = {}
    for variant in variants:
        outcome = train_variant(variant, args, store)
        s = summarize(store, outcome)
        change = ", ".join(f"{k}: {v}" for k, v in VARIANTS[variant].items()) or "the shipped recipe"
        if s is None:
            lines.append(f"| {variant} | {change} | {outcome.skipped} | | | | | | |")
            continue
        runs[variant] = outcome.run
        (acc, balanced), (flip_acc, flip_balanced) = (figures(outcome.run, args, flip) for flip in (False, True))
        lines.append(f"| {variant} | {change} | {s['acc']:.1%} | {s['balanced']:.1%} | {acc:.1%} | {flip_acc:.1%} | "
                     f"{balanced:.1%} | {flip_balanced:.1%} | {s['final_stage_s']:.0f} s |")
        print("\n".join(lines), flush=True)
    if sizes:
        lines += size_table(runs, sizes, args)
    report = "\n".join(lines)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
