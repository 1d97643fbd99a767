"""The staged-pretraining study on Caltech-101: what does each pretraining stage buy?

Runs the shipped pipelines of ``train/configs/caltech101-*.yaml`` one after the other, exactly as a user
would (``python -m train run CONFIG --data-root DIR --set ...``), at one scale:

- ``--scale gpu``: the configs as shipped (the full recipe: Caltech-101 at 96 px for 60 epochs, Tiny ImageNet
  and CIFAR-100 for 30 epochs each at 64 px).
- ``--scale cpu``: the same pipelines shrunk to fit 2 CPU cores in about an hour in total (the overrides are in
  ``SCALES`` below and are printed with the table).

Every pipeline ends with the same Caltech-101 stage (same recipe, same split, same seed), so the last stage's
figures compare what the earlier stages bought. Pipelines whose data or weights are missing are skipped with the
reason (CIFAR-100 and the ImageNet weights are not on every machine). A finished run is not trained again: rerun
the same command after an interruption and it carries on (``--fresh`` starts over).

Prints (and with ``--out``, writes) a markdown table: accuracy and balanced accuracy of the final Caltech-101
stage (last epoch and best epoch), the stage's and the pipeline's wall time, and the images/s of the final stage;
then the per-class comparison of the best staged run against scratch (``python -m train compare``).

    python bench/study.py --scale cpu --data-root data --home /tmp/study [--out study.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.paths import reslens_home  # noqa: E402
from core.run_store import RunStore  # noqa: E402

DEFAULT_HOME = reslens_home() / "study"  # its own store, next to the user's runs (RESLENS_HOME)

PIPELINES = {  # key -> (config, what it needs beyond Caltech-101)
    "scratch": ("caltech101-scratch.yaml", ()),
    "tiny": ("caltech101-tiny.yaml", ("tinyimagenet",)),
    "tiny-cifar": ("caltech101-tiny-cifar.yaml", ("tinyimagenet", "cifar100")),
    "imagenet": ("caltech101-imagenet.yaml", ("imagenet-weights",)),
}

# --set overrides per scale: stage name -> {key: value}. gpu = the configs as shipped.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {},
    "cpu": {
        "tinyimagenet": {"epochs": 2, "image_size": 48, "batch_size": 128, "lr": 0.1, "warmup_epochs": 0.25,
                         "num_workers": 0},
        "cifar100": {"epochs": 2, "image_size": 48, "batch_size": 128, "lr": 0.1, "warmup_epochs": 0.25,
                     "num_workers": 0},
        "caltech101": {"epochs": 15, "image_size": 64, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1,
                       "num_workers": 0},
    },
}


@dataclass
class Outcome:
    key: str
    run: str | None
    skipped: str | None = None
    wall_s: float | None = None


def overrides(scale: str) -> list[str]:
    return [f"stages.{stage}.{key}={json.dumps(value)}"
            for stage, values in SCALES[scale].items() for key, value in values.items()]


def missing(needs: tuple[str, ...], data_root: Path) -> str | None:
    """Why a pipeline cannot run here (a data set or the weights are absent), or None."""
    from core.datasets import DatasetMissing, class_counts
    from core.models import imagenet_weights_file

    for need in needs:
        if need == "imagenet-weights":
            path = imagenet_weights_file("resnet50")
            if not path.is_file():
                return f"no ImageNet weights ({path} is missing)"
            continue
        try:
            class_counts(need, data_root, "train")
        except DatasetMissing:
            return f"{need} is not under {data_root}"
    return None


def run_pipeline(key: str, scale: str, args: argparse.Namespace, store: RunStore) -> Outcome:
    config, needs = PIPELINES[key]
    run = f"study-{scale}-{key}"
    reason = missing(needs, args.data_root)
    if reason:
        print(f"[{key}] skipped: {reason}", flush=True)
        return Outcome(key, None, skipped=reason)
    names = _stage_names(config)  # overrides only for the stages this pipeline has
    sets = [x for o in overrides(scale) if o.split(".")[1] in names for x in ("--set", o)]
    if args.workers is not None:  # recorded in the stage config, but per-sample seeds make results independent of it
        sets += [x for name in sorted(names) for x in ("--set", f"stages.{name}.num_workers={args.workers}")]
    run_args = [f"train/configs/{config}", "--data-root", str(args.data_root), *sets]
    return train_or_reuse(key, run, run_args + (["--device", args.device] if args.device else []), args, store)


def train_or_reuse(key: str, run: str, run_args: list[str], args: argparse.Namespace, store: RunStore) -> Outcome:
    """``python -m train run RUN_ARGS --run-name RUN`` as a user would; an interrupted run is resumed, a finished
    one reused (``args.fresh``: trained again)."""
    fresh = getattr(args, "fresh", False)
    known = {r["name"]: r for r in store.list_runs()}
    if run in known and known[run]["state"] == "finished" and not fresh:
        print(f"[{key}] {run} already finished: reusing it", flush=True)
        return Outcome(key, run)
    verb = ["resume", run] if run in known and not fresh else ["run", *run_args, "--run-name", run]
    command = [sys.executable, "-m", "train", *verb]
    print(f"[{key}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=_env(args))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"[{key}] failed (exit {done.returncode}); its output is above", flush=True)
        return Outcome(key, run, skipped=f"failed (exit {done.returncode})", wall_s=wall)
    return Outcome(key, run, wall_s=wall)


def _stage_names(config: str) -> set[str]:
    from train.config import load_config

    return {s.name for s in load_config(REPO / "train" / "configs" / config, check_data=False).stages}


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "RESLENS_HOME": str(args.home)}
    if getattr(args, "threads", None):
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def summarize(store: RunStore, outcome: Outcome) -> dict[str, Any] | None:
    """The final Caltech-101 stage's figures and the run's times, from the run store."""
    if outcome.run is None or outcome.skipped:
        return None
    stages = store.stages(outcome.run)
    last = stages[-1]
    rows = store.metrics(outcome.run, "epoch", stage=last["idx"])
    if not rows:
        return None
    best = max(rows, key=lambda r: r["val_acc"])
    epoch_time = [r["epoch_time_s"] or 0.0 for r in rows]
    all_rows = store.metrics(outcome.run, "epoch")
    return {
        "pipeline": " -> ".join(s["dataset"] for s in stages),
        "acc": rows[-1]["val_acc"], "balanced": rows[-1]["val_balanced_acc"],
        "best_acc": best["val_acc"], "best_balanced": max(r["val_balanced_acc"] for r in rows),
        "final_stage_s": sum(epoch_time),
        "train_s": sum((r["epoch_time_s"] or 0.0) for r in all_rows),
        "wall_s": outcome.wall_s,
        "images_per_s": _mean([r["images_per_s"] for r in rows if r["images_per_s"]]),
        "run": outcome.run,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table(results: list[tuple[Outcome, dict[str, Any] | None]], scale: str) -> str:
    lines = [
        f"Scale `{scale}`; every figure is the final Caltech-101 stage's validation split (1,736 images, 101 classes).",
        "",
        "| pipeline | acc (last epoch) | balanced acc (last epoch) | best acc | best balanced | final stage time | "
        "training time, all stages | wall time | final stage img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for outcome, s in results:
        if s is None:
            lines.append(f"| {outcome.key} | skipped: {outcome.skipped} | | | | | | | |")
            continue
        wall = f"{s['wall_s']:.0f} s" if s["wall_s"] else "(earlier run)"
        lines.append(
            f"| {s['pipeline']} | **{s['acc']:.1%}** | **{s['balanced']:.1%}** | {s['best_acc']:.1%} | "
            f"{s['best_balanced']:.1%} | {s['final_stage_s']:.0f} s | {s['train_s']:.0f} s | {wall} | "
            f"{s['images_per_s']:.0f} |")
    base = next((s for o, s in results if o.key == "scratch" and s), None)
    for outcome, s in results:
        if base and s and outcome.key != "scratch":
            lines.append("")
            lines.append(f"{s['pipeline']} vs scratch: accuracy {100 * (s['acc'] - base['acc']):+.1f} points, "
                         f"balanced accuracy {100 * (s['balanced'] - base['balanced']):+.1f} points (last epoch).")
    return "\n".join(lines)


def compare_report(results: list[tuple[Outcome, dict[str, Any] | None]], args: argparse.Namespace) -> str:
    """``python -m train compare scratch best-staged --format md`` (when that command exists)."""
    done = {o.key: s for o, s in results if s}
    staged = [k for k in done if k != "scratch"]
    if "scratch" not in done or not staged:
        return ""
    best = max(staged, key=lambda k: done[k]["balanced"])
    command = [sys.executable, "-m", "train", "compare", done["scratch"]["run"], done[best]["run"], "--format", "md"]
    found = subprocess.run(command, cwd=REPO, env=_env(args), capture_output=True, text=True)
    if found.returncode != 0:
        return f"(`train compare` failed: {found.stderr.strip()})"
    return f"`python -m train compare {done['scratch']['run']} {done[best]['run']} --format md`:\n\n{found.stdout}"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def check_before_training(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before hours of training, a report that could not be written or a data root without Caltech-101
    (every pipeline ends on it)."""
    from core.datasets import class_counts
    from core.errors import UserError

    out = args.out
    if out is not None and (out.is_dir() or not out.resolve().parent.is_dir()):
        parser.error(f"--out {out}: " + ("that is a folder" if out.is_dir() else "its folder does not exist"))
    try:
        class_counts("caltech101", args.data_root)
    except UserError as exc:
        parser.error(str(exc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--data-root", type=Path, default=REPO / "data",
                        help="folder holding caltech101/ and tiny-imagenet-200/ (and cifar-100-python/)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="ResLens home for the study's runs (kept, so an interrupted study carries on; "
                             "default: $RESLENS_HOME/study, %(default)s here)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"subset of {', '.join(PIPELINES)}")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--workers", type=int, help="DataLoader workers for every stage of a new run (default: the "
                        "configs'); the figures do not depend on it, per-sample seeds fix every draw")
    parser.add_argument("--fresh", action="store_true", help="train every pipeline again")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    args.home, args.data_root = args.home.resolve(), args.data_root.resolve()
    check_before_training(parser, args)
    args.home.mkdir(parents=True, exist_ok=True)
    os.environ["RESLENS_HOME"] = str(args.home)
    store = RunStore(args.home / "reslens.sqlite")
    keys = [k.strip() for k in args.pipelines.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipeline {unknown[0]!r}; choose from {', '.join(PIPELINES)}")
    results = []
    for key in keys:
        outcome = run_pipeline(key, args.scale, args, store)
        results.append((outcome, summarize(store, outcome)))
    report = "\n\n".join(filter(None, [
        table(results, args.scale),
        "Overrides of this scale: " + (" ".join(f"`{o}`" for o in overrides(args.scale)) or "none (as shipped)"),
        compare_report(results, args),
    ]))
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
