"""`python -m train run|resume|list|export|eval`: the training commands (see train/cli.py)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import wcwidth

from core import paths
from core.errors import UserError
from core.sizes import iec_bytes
from core.run_store import METRIC_COLUMNS, RunStore, RunStoreError
from train.cli import at_least, folder

EXPORT_KEYS = ("kind", "stage", "stage_name", "epoch", "step", "time")


# ----------------------------------------------------------------------- run
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML, e.g. train/configs/demo.yaml")
    p.add_argument("--run-name", help="name of the run (default: the config's name, made unique)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="default: cuda, else mps, else cpu")
    p.add_argument("--data-root", type=folder, help="folder holding the data sets (for stages whose root is null)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: arch=resnet18, stages.2.epochs=3, stages.finetune.lr=0.01, "
                        "batch_size=32 (every stage); repeatable")
    p.add_argument("--epochs", type=int, help="shortcut for --set epochs=N (every stage)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """Run a training pipeline in the foreground (progress bar with images/s and ETA)."""
    from train import distributed as ddp
    from train.config import load_config
    from train.engine import train_run
    from train.jobs import what_is_missing

    overrides = list(args.overrides) + ([f"epochs={args.epochs}"] if args.epochs is not None else [])
    try:
        config = load_config(args.config, overrides, data_root=args.data_root, check_data=False)
        missing = what_is_missing(config)  # on every rank: a refusal ends them all alike, before the run is made
        if missing:
            raise UserError(missing[0] if len(missing) == 1 else
                            f"{len(missing)} stages cannot start:\n" + "\n".join(f"  {m}" for m in missing))
    except UserError as exc:
        _fail_queued_row(args.run_name, str(exc))
        raise
    ctx = ddp.setup(args.device)
    try:
        store = RunStore() if ctx.is_main else None
        name = ddp.broadcast(ctx, _claim_run(config, store, args.run_name) if store is not None else None)
        if name is None:
            print(f"Run {args.run_name} was stopped before it started.", flush=True)
            return 1
        if ctx.is_main and not args.quiet:
            print(f"Run {name} on {ctx.device} (x{ctx.world}); `python -m train list` shows it.", flush=True)
        state = train_run(config, name, ctx, store, show_progress=not args.quiet)
    finally:
        ddp.teardown(ctx)
    return exit_status(state, ctx)


def exit_status(state: str, ctx: Any) -> int:
    """0 for a finished run, else 1; but under torchrun every rank of a stopped run exits 0: torchrun reports
    any other status as a failure (a traceback and "FAILED") and ends the other ranks at once, maybe while rank 0
    still records the stop. The stop is said in rank 0's last line and in the run store."""
    return 0 if state == "finished" or (state == "stopped" and ctx.enabled) else 1


def _fail_queued_row(run_name: str | None, error: str) -> None:
    """A detached job that cannot start records why, so the app shows it (not just 'interrupted')."""
    if not run_name:
        return
    store = RunStore()
    if store.has_run(run_name):
        row = store.get_run(run_name)
        if row["stored_state"] == "queued" and row.get("pid") in (None, os.getpid()):
            store.set_state(run_name, "failed", error=error)


def _claim_run(config: Any, store: RunStore, run_name: str | None) -> str | None:
    """Take over the queued row ``train.jobs.launch`` made for us, or create the run.

    None when the app stopped our queued run before we got here.
    """
    from train.jobs import prepare_run

    if run_name and store.has_run(run_name):
        row = store.get_run(run_name)
        ours = row.get("pid") in (None, os.getpid())
        if ours and row["stored_state"] == "queued":
            return run_name
        if ours and row["stored_state"] == "stopped" and not store.has_metrics(run_name):
            return None
    return prepare_run(config, store, run_name, state="queued", pid=os.getpid())


# -------------------------------------------------------------------- resume
def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_name", metavar="RUN")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="default: cuda, else mps, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def resume(args: argparse.Namespace) -> int:
    """Continue a stopped, failed or interrupted run from its last checkpoint."""
    from train import distributed as ddp
    from train.config import parse_config
    from train.engine import train_run

    store = RunStore()
    row = store.get_run(args.run_name)
    _check_resumable(row)
    config = parse_config(row["config"], data_root=None)
    ctx = ddp.setup(args.device)
    try:
        state = train_run(config, args.run_name, ctx, store if ctx.is_main else None, resume=True,
                          show_progress=not args.quiet)
    finally:
        ddp.teardown(ctx)
    return exit_status(state, ctx)


def _check_resumable(row: dict[str, Any]) -> None:
    from train.jobs import refuse_live_trainer

    if row["state"] == "finished":
        raise RunStoreError(f"Run {row['name']!r} has already finished; there is nothing to resume.")
    refuse_live_trainer(row, own_pid=os.getpid())


# ---------------------------------------------------------------------- list
def add_list_arguments(p: argparse.ArgumentParser) -> None:
    pass


def list_runs(args: argparse.Namespace) -> int:
    """A line per run: name, state, stage, epoch, best accuracy."""
    if not paths.reslens_home().exists():  # a listing makes no folder: a mistyped RESLENS_HOME stays absent
        print(f"No runs yet in {paths.reslens_home()}; start one with "
              "`python -m train run train/configs/demo.yaml`.")
        return 0
    store = RunStore()
    rows = [run_line(store, r) for r in store.list_runs()]
    if not rows:
        print("No runs yet; start one with `python -m train run train/configs/demo.yaml`.")
        return 0
    header = ("RUN", "STATE", "STAGE", "EPOCH", "BEST ACC")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0


def run_line(store: RunStore, run: dict[str, Any]) -> tuple[str, str, str, str, str]:
    stages = store.stages(run["name"])
    n_stages = len(run["config"].get("stages", [])) or len(stages)
    stage_index = run["stage"] if run["stage"] is not None else 0
    current = next((s for s in stages if s["idx"] == stage_index), None)
    stage = f"{stage_index + 1}/{n_stages}" + (f" {current['name']}" if current else "")
    epoch = f"{run['shown_epoch']}/{current['epochs']}" if current and run["shown_epoch"] is not None else "-"
    best = f"{run['best_val_acc']:.3f}" if run["best_val_acc"] is not None else "-"
    return run["name"], run["state"], stage, epoch, best


# -------------------------------------------------------------------- export
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_name", metavar="RUN")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--output", "-o", help="file to write (default: standard output)")


def export(args: argparse.Namespace) -> int:
    """Every metric row of a run (steps and epochs) as CSV or JSON."""
    store = RunStore()
    store.get_run(args.run_name)  # a clear error for an unknown run
    rows = export_rows(store, args.run_name)
    text = to_json(rows) if args.format == "json" else to_csv(rows)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def export_rows(store: RunStore, name: str) -> list[dict[str, Any]]:
    """Flat rows: kind, stage (numbered from 1), stage_name, epoch, step, time and every metric that has a value."""
    names = {s["idx"]: s["name"] for s in store.stages(name)}
    rows = []
    for r in store.all_metrics(name):
        row = {k: names.get(r["stage"]) if k == "stage_name" else r[k] for k in EXPORT_KEYS}
        row["stage"] = r["stage"] + 1
        row.update({k: r[k] for k in METRIC_COLUMNS if r.get(k) is not None})
        rows.append(row)
    return rows


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*EXPORT_KEYS, *METRIC_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# -------------------------------------------------------------------- delete
def add_delete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_names", metavar="RUN", nargs="+")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def delete(args: argparse.Namespace) -> int:
    """Delete runs for good (checkpoints, log, metrics), after a confirmation; says how much space was freed."""
    from train import jobs

    store, names = RunStore(), list(dict.fromkeys(args.run_names))  # a name given twice is deleted once
    for name in names:
        jobs.check_deletable(store.get_run(name))  # every run known and deletable before anything goes
    sizes = {name: jobs.disk_usage(name) for name in names}
    listed = ", ".join(f"{n} ({iec_bytes(s)})" for n, s in sizes.items())
    if not args.yes and not confirmed(f"Delete {listed} with all their checkpoints and metrics?", "Deleting runs"):
        print("Nothing deleted.")
        return 1
    freed = 0
    for name in names:
        freed += jobs.delete(name)
        print(f"Deleted run {name}.")
    print(f"Freed {iec_bytes(freed)}.")
    return 0


def confirmed(question: str, action: str) -> bool:
    """Ask ``question`` on the terminal (y/N); without a terminal, say that ``action`` needs --yes."""
    if not sys.stdin.isatty():
        raise UserError(f"{action} needs a confirmation: answer on a terminal, or add --yes.")
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:  # Ctrl-D: no answer is a no
        print()
        return False


# ---------------------------------------------------------------------- eval
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a ResLens checkpoint (.pt)")
    p.add_argument("--dataset", help="data set name (default: the one the checkpoint was trained on)")
    p.add_argument("--root", type=folder, help="data set root (default: the training root, or the data root)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top", type=at_least(0), default=10, help="how many confused pairs to print (default: 10)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips: average each image's logits with its mirror's (default: the stage's tta)")
    p.add_argument("--image-size", type=int,
                   help="test resolution in pixels (default: the one it was trained at); the split is decoded "
                        "once more into the image cache at that size")


def evaluate(args: argparse.Namespace) -> int:
    """Per-class evaluation of a checkpoint on a split, stored in the run store and printed."""
    from core.evaluation import confused_pairs
    from train.engine import evaluate_checkpoint

    if args.image_size is not None and not 16 <= args.image_size <= 1024:
        raise UserError(f"--image-size must be between 16 and 1024 pixels, got {args.image_size}.")
    found = evaluate_checkpoint(args.checkpoint, args.dataset, args.root, args.split, args.device,
                                args.batch_size, store=RunStore(), flip=args.tta, image_size=args.image_size)
    r = found.result
    if r.get("note"):
        print(f"warning: {r['note']}", file=sys.stderr)
    top5 = f", top-5 accuracy {r['top5_acc']:.4f}" if r.get("top5_acc") is not None else ""
    size = f", at {args.image_size} px" if args.image_size else ""
    print(f"{found.checkpoint} on {found.dataset} ({found.split}, {sum(r['val_counts'])} images{size}): "
          f"accuracy {r['accuracy']:.4f}, balanced accuracy {r['balanced_acc']:.4f}{top5} [evaluation {found.id}]")
    print("\n".join(class_table(r)))
    pairs = confused_pairs(r["confusion"], r["classes"], args.top)
    if pairs:
        print("Most confused (true -> predicted):")
        for p in pairs:
            print(f"  {p['true']} -> {p['predicted']}: {p['count']} ({p['rate']:.1%} of {p['true']})")
    return 0


def class_table(r: dict[str, Any]) -> list[str]:
    """``eval``'s table of a class result, worst recall first; names aligned by terminal cells, not characters."""
    def f(value: float | None) -> str:
        return "-" if value is None else format(value, ".3f")

    lines = [f"{'CLASS':30} {'TRAIN':>6} {'N':>5} {'CORRECT':>7} {'RECALL':>6} {'PRECIS':>6} {'F1':>6}"]
    order = sorted(range(len(r["classes"])), key=lambda i: (r["per_class_acc"][i] is None, r["per_class_acc"][i]))
    for i in order:
        name = wcwidth.ljust(wcwidth.clip(r["classes"][i], 0, 30), 30)
        lines.append(f"{name} {r['train_counts'][i]:>6} {r['val_counts'][i]:>5} {r['correct'][i]:>7} "
                     f"{f(r['per_class_acc'][i]):>6} {f(r['precision'][i]):>6} {f(r['f1'][i]):>6}")
    return lines


COMMANDS = {
    "run": (add_run_arguments, run),
    "resume": (add_resume_arguments, resume),
    "list": (add_list_arguments, list_runs),
    "export": (add_export_arguments, export),
    "eval": (add_eval_arguments, evaluate),
    "delete": (add_delete_arguments, delete),
}
