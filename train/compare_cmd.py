"""`python -m train compare RUN RUN... [--format md|csv|json] [--stage N] [--top K] [--plot FILE] [-o FILE]`.

Compares runs from the run store (core/compare.py): the config keys that differ, final and best accuracy and
balanced accuracy per stage, and per-class accuracy of every later run against the first (each run's last stage
with per-class results, or stage N of both), with the biggest gains and losses.

* ``md``: a readable report. ``json``: the same data nested (every config key, every class).
* ``csv``: one tidy table; the ``section`` column says what a row is (``config``: one row per key and run;
  ``stage``: one row per run and stage; ``class``: one row per class of a run against the first). A class row's
  ``against``/``acc_against`` are json's ``run_a``/``acc_a`` (the first run), ``run``/``acc_run`` its
  ``run_b``/``acc_b``.
* ``--plot FILE`` (``.png``, ``.svg``, ``.pdf`` or ``.html``): the per-class scatter of the second run against the
  first; with more runs, one file per later run (``FILE`` stem + ``-RUN``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from core import charts
from core.compare import ClassChange, ClassComparison, Comparison, CompareError, compare_runs
from core.run_store import RunStore
from train.cli import at_least

FORMATS = ("md", "csv", "json")
CSV_COLUMNS = ("section", "run", "against", "stage", "against_stage", "key", "value", "differs", "name", "dataset", "epochs",
               "completed_epochs", "final_acc", "final_balanced_acc", "best_acc", "best_balanced_acc", "best_epoch",
               "class", "train_count", "val_count", "acc_against", "acc_run", "delta")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="two or more runs; later ones are set against the first")
    parser.add_argument("--format", choices=FORMATS, default="md", help="md (default), csv or json")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="compare classes on stage N (from 1) of every run (default: each run's last stage)")
    parser.add_argument("--top", type=at_least(0), default=10, metavar="K",
                        help="gains and losses to list (default: 10)")
    parser.add_argument("--plot", metavar="FILE",
                        help="also write the per-class scatter: .png, .svg, .pdf (matplotlib) or .html (plotly)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the report here (default: standard output)")


def run(args: argparse.Namespace) -> int:
    """Compare runs: config differences, results per stage, per-class gains and losses."""
    comparison = compare_runs(RunStore(), args.runs, args.stage)
    where = Path(args.output).resolve().parent if args.output else None
    if where is not None and not where.is_dir():  # before any picture is written
        raise CompareError(f"Cannot write the report to {args.output}: the folder {where} does not exist.")
    written = write_plots(comparison, args.plot) if args.plot else []
    text = {"md": markdown, "csv": to_csv, "json": to_json}[args.format](comparison, args.top)
    if args.format == "md" and written:
        text += "\n" + "".join(plot_link(c, path, args.output) + "\n" for c, path in written)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------------------------------------ pictures
def plot_link(c: ClassComparison, path: Path, output: str | None) -> str:
    """A markdown link to a written picture, relative to the report's folder (``-o``) so it works where the report
    is read: an image for .png/.svg/.pdf, a plain link for an interactive .html."""
    where = Path(os.path.relpath(Path(path).resolve(), Path(output).resolve().parent)) if output else Path(path)
    text = f"{c.run_b} against {c.run_a}"
    return f"[{text} (interactive)]({where.as_posix()})" if where.suffix == ".html" else f"![{text}]({where.as_posix()})"


def plot_paths(base: str, comparisons: list[ClassComparison]) -> list[Path]:
    """``base`` for one comparison; ``<stem>-<run><suffix>`` for each of several."""
    path = Path(base)
    if len(comparisons) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{c.run_b}{path.suffix}") for c in comparisons]


def write_plots(comparison: Comparison, base: str) -> list[tuple[ClassComparison, Path]]:
    """Write the per-class scatter of every later run against the first; comparisons without shared classes are
    skipped, each with a note on standard error."""
    suffix = Path(base).suffix.lower()
    if suffix not in (".html", *charts.STATIC_FORMATS):
        raise CompareError(f"--plot must name a .png, .svg, .pdf or .html file, not {base!r}.")
    written = []
    for c, path in zip(comparison.classes, plot_paths(base, comparison.classes)):
        if not c.classes:
            print(f"note: {path} was not written: {c.message}", file=sys.stderr)
            continue
        try:
            charts.write_class_scatter(c.frame(), c.run_a, c.run_b, path)
        except ImportError:
            raise CompareError("A static picture needs matplotlib (pip install matplotlib); "
                               "or ask for an .html file.") from None
        except OSError as exc:
            raise CompareError(f"Cannot write {path}: {exc.strerror or exc}.") from None
        written.append((c, path))
    return written


# ---------------------------------------------------------------------------------------------- markdown
def percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def points(delta: float | None) -> str:
    """A change of accuracy in percentage points: '+12.5 pts'."""
    return "-" if delta is None else f"{delta * 100:+.1f} pts"


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(comparison: Comparison, top: int) -> str:
    parts = [f"# Comparison of {', '.join(comparison.runs)}\n", _config_md(comparison), _stages_md(comparison)]
    parts += [_classes_md(c, top) for c in comparison.classes]
    return "\n".join(parts)


def _config_md(comparison: Comparison) -> str:
    diffs = comparison.differences()
    same = len(comparison.config) - len(diffs)
    head = "## Configuration differences\n\n"
    if not diffs:
        return head + f"The configs are identical ({same} keys).\n"
    rows, shown_stages = [], set()
    for r in diffs:
        stage = _stage_of(r.key)
        if stage is None or stage <= min(len(names) for names in comparison.stage_names.values()):
            rows.append([f"`{r.key}`", *(charts.config_text(r.values[run]) or "(none)" for run in comparison.runs)])
        elif stage not in shown_stages:  # a stage some run does not have: one row, not one per key
            shown_stages.add(stage)
            rows.append([f"`stages.{stage}`", *(_stage_summary(comparison, run, stage) for run in comparison.runs)])
    return head + table(["key", *comparison.runs], rows) + f"\n{same} other keys are the same in every run.\n"


def _stage_of(key: str) -> int | None:
    """N of a ``stages.N.key`` (None for a top-level key)."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "stages" and parts[1].isdigit() else None


def _stage_summary(comparison: Comparison, run: str, stage: int) -> str:
    """'finetune (shapes-lt), see its keys in --format json' or '(none)' for a stage only some runs have."""
    if stage > len(comparison.stage_names[run]):
        return "(none)"
    dataset = next((r.values[run] for r in comparison.config if r.key == f"stages.{stage}.dataset"), "")
    return f"{comparison.stage_names[run][stage - 1]} ({dataset}); all keys in --format json"


def _stages_md(comparison: Comparison) -> str:
    rows = [[s.run, f"{s.stage} {s.name}", s.data_set, f"{s.completed_epochs}/{s.epochs}", percent(s.final_acc),
             percent(s.final_balanced_acc), percent(s.best_acc), percent(s.best_balanced_acc)]
            for s in comparison.stages]
    return "## Results per stage\n\n" + table(
        ["run", "stage", "data set", "epochs", "final acc", "final balanced acc", "best acc", "best balanced acc"],
        rows)


def _classes_md(c: ClassComparison, top: int) -> str:
    head = f"## Per class: {c.run_b} against {c.run_a}"
    if c.stage_a is not None:
        head += f" ({c.run_a}: stage {c.stage_a}, {c.data_a}; {c.run_b}: stage {c.stage_b}, {c.data_b})"
    head += "\n\n"
    if not c.classes:
        return head + f"{c.message}\n"
    text = head + f"{c.counts_text()}; mean change {points(c.summary()['mean_change'])}."
    text += f" {c.message}\n" if c.message else "\n"
    header = ["class", "train images", c.run_a, c.run_b, "change"]
    for title, changes in (("Biggest gains", c.gains(top)), ("Biggest losses", c.losses(top))):
        text += f"\n### {title}\n\n"
        text += table(header, [_class_row(x) for x in changes]) if changes else "None.\n"
    return text


def _class_row(x: ClassChange) -> list[Any]:
    return [x.name, "-" if x.train_count is None else x.train_count, percent(x.acc_a), percent(x.acc_b),
            points(x.delta)]


# ----------------------------------------------------------------------------------------- csv and json
def to_json(comparison: Comparison, top: int) -> str:
    return json.dumps(comparison.to_dict(top), indent=1) + "\n"


def csv_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """The tidy rows of ``--format csv`` (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    for r in comparison.config:
        rows += [{"section": "config", "run": run, "key": r.key, "value": charts.config_text(value),
                  "differs": r.differs} for run, value in r.values.items()]
    for s in comparison.stages:
        rows.append({"section": "stage", "run": s.run, "stage": s.stage, "name": s.name, "dataset": s.dataset,
                     "epochs": s.epochs, "completed_epochs": s.completed_epochs, "final_acc": s.final_acc,
                     "final_balanced_acc": s.final_balanced_acc, "best_acc": s.best_acc,
                     "best_balanced_acc": s.best_balanced_acc, "best_epoch": s.best_epoch})
    for c in comparison.classes:
        rows += [{"section": "class", "run": c.run_b, "against": c.run_a, "stage": c.stage_b,
                  "against_stage": c.stage_a, "class": x.name,
                  "train_count": x.train_count, "val_count": x.val_count, "acc_against": x.acc_a,
                  "acc_run": x.acc_b, "delta": x.delta} for x in c.classes]
    return rows


def to_csv(comparison: Comparison, top: int) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(comparison))
    return out.getvalue()


COMMANDS = {"compare": (add_arguments, run)}
