"""Run comparison: what differs between two or more runs and what it bought, stage by stage and class by class.

Everything is read from the run store (no model runs). Stages are numbered from 1 here, as in the config
overrides (``stages.2.lr``) and error messages; the store numbers them from 0.

* ``flatten_config`` / ``config_rows``: the pipeline configs side by side, one row per key
  (``arch``, ``stages.1.lr``, ``stages.1.options.root``...), each flagged when the runs disagree.
* ``stage_results``: final and best accuracy and balanced accuracy of every stage of a run.
* ``class_comparison`` / ``compare_classes``: per-class accuracy of run B against run A on the final stage of each
  (or a chosen stage), matched by class name, with class sizes, the change and the biggest gains and losses.
* ``compare_runs``: all of it for 2+ runs (every later run against the first), plus the epoch curves.

A comparison reads each run's rows once (``RunRows``: config, stages, epoch metrics, then per-class results as
they are needed) and hands them to every part.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from core.datasets import DATASETS
from core.errors import UserError
from core.run_store import ACTIVE_STATES, RunStore

MISSING = None  # the value a key has in a run whose config lacks it


class CompareError(UserError):
    """A comparison that cannot be made, in one sentence."""


# ------------------------------------------------------------------------------------------- store rows
@dataclass
class RunRows:
    """One run's rows, each read from the store at most once per comparison: the config, the stage rows (by
    0-based index), the epoch metric frame, and per-class results when first asked for."""

    store: RunStore
    name: str
    config: dict[str, Any]
    stages: dict[int, dict[str, Any]]
    epochs: pd.DataFrame
    state: str = "finished"
    _class_results: dict[int, dict[str, Any] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, store: RunStore, run: str) -> RunRows:
        """Read ``run`` (``RunNotFound`` when the store has no such run)."""
        row = store.get_run(run)
        return cls(store, run, row["config"] or {}, {s["idx"]: s for s in store.stages(run)},
                   store.metrics_frame(run, "epoch"), row["state"])

    @cached_property
    def class_stages(self) -> list[int]:
        """0-based indices of the stages that have per-class results, ascending."""
        return [index for index in self.stages if self.store.class_result_epochs(self.name, index)]

    @property
    def stage_count(self) -> int:
        """Stages of the run: its config's, or more where the store has rows beyond them."""
        return max(len(self.config.get("stages") or []), max(self.stages, default=-1) + 1)

    def planned(self, index: int) -> dict[str, Any]:
        """Stage ``index`` as the run's config has it ({} beyond its stages)."""
        stages = self.config.get("stages") or []
        return stages[index] if index < len(stages) and isinstance(stages[index], dict) else {}

    def data_folder(self, index: int) -> str:
        """The folder name of stage ``index``'s image folder ('' for a named data set): two runs on other folders
        of images both train on "imagefolder"."""
        planned, row = self.planned(index), self.stages.get(index)
        info = DATASETS.get(row["dataset"] if row else planned.get("dataset"))
        root = planned.get("root")
        return Path(root).name if info is not None and info.own_folder and root else ""

    def class_result(self, index: int) -> dict[str, Any] | None:
        """The last per-class result of stage ``index`` (``RunStore.class_results``)."""
        if index not in self._class_results:
            self._class_results[index] = self.store.class_results(self.name, index)
        return self._class_results[index]


# ----------------------------------------------------------------------------------------------- configs
@dataclass
class ConfigRow:
    """One flattened config key with its value in every run (run name -> value) and whether they differ."""

    key: str
    values: dict[str, Any]
    differs: bool


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys as they are, stage keys as ``stages.N.key`` (N from 1), nested dicts joined with dots;
    lists other than ``stages`` stay whole (as JSON-ready lists)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == "stages" and isinstance(value, list):
            for i, stage in enumerate(value, start=1):
                _flatten_into(flat, f"stages.{i}", _used_keys(stage) if isinstance(stage, Mapping) else {"": stage})
        else:
            _flatten_into(flat, key, value)
    return flat


def _used_keys(stage: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stage's keys less the ``root`` of a generated data set (it reads no files: the data root it was given
    changes nothing)."""
    info = DATASETS.get(stage.get("dataset"))
    if info is None or info.folder is not None or info.own_folder:
        return stage
    return {k: v for k, v in stage.items() if k != "root"}


def _flatten_into(flat: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            _flatten_into(flat, f"{prefix}.{key}" if key != "" else prefix, inner)
    else:
        flat[prefix] = {} if isinstance(value, Mapping) else value


def config_rows(configs: Mapping[str, Mapping[str, Any]]) -> list[ConfigRow]:
    """The configs side by side (``configs`` maps a run name to its config): every key any run has, in the order
    they first appear; a key that one run lacks (a config of an older ResLens, or an option left out) has ``None``
    there, the same as a null or an empty mapping."""
    flats = {run: flatten_config(config) for run, config in configs.items()}
    keys = dict.fromkeys(k for flat in flats.values() for k in flat)
    rows = []
    for key in keys:
        values = {run: flat.get(key, MISSING) for run, flat in flats.items()}
        rows.append(ConfigRow(key, values, len({_canonical(v) for v in values.values()}) > 1))
    return rows


def _canonical(value: Any) -> str:
    """A comparable text for any config value (1 and 1.0 are the same learning rate; null, absent and ``{}`` are
    the same; false is false)."""
    if value is None or (isinstance(value, Mapping) and not value):
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class StageResult:
    """Results of one stage of one run (``stage`` from 1); accuracies are None until an epoch is validated."""

    run: str
    stage: int
    name: str
    dataset: str
    epochs: int
    completed_epochs: int
    final_acc: float | None = None
    final_balanced_acc: float | None = None
    best_acc: float | None = None
    best_balanced_acc: float | None = None
    best_epoch: int | None = None
    folder: str = ""  # an image folder's folder name (RunRows.data_folder)

    @property
    def data_set(self) -> str:
        return data_text(self.dataset, self.folder)


def stage_results(store: RunStore, run: str) -> list[StageResult]:
    """Every stage of ``run`` (those of its config that have not started yet too): the last validated epoch's
    accuracy and balanced accuracy, and the best of each over the stage's epochs."""
    return _stage_results(RunRows.load(store, run))


def _stage_results(rows: RunRows) -> list[StageResult]:
    run, stored, frame = rows.name, rows.stages, rows.epochs
    results = []
    for index in range(rows.stage_count):
        row, planned = stored.get(index), rows.planned(index)
        result = StageResult(
            run=run, stage=index + 1,
            name=row["name"] if row else planned.get("name") or f"stage{index + 1}",
            dataset=row["dataset"] if row else planned.get("dataset", ""), folder=rows.data_folder(index),
            epochs=int(row["epochs"] if row else planned.get("epochs") or 0),
            completed_epochs=int(row["completed_epochs"]) if row else 0,
        )
        _fill_accuracies(result, frame[frame["stage"] == index])
        results.append(result)
    return results


def _fill_accuracies(result: StageResult, epochs: pd.DataFrame) -> None:
    validated = epochs.dropna(subset=["val_acc"]).sort_values("epoch")
    if validated.empty:
        return
    last = validated.iloc[-1]
    result.final_acc = float(last["val_acc"])
    result.final_balanced_acc = _number(last["val_balanced_acc"])
    best = validated.loc[validated["val_acc"].idxmax()]
    result.best_acc, result.best_epoch = float(best["val_acc"]), int(best["epoch"])
    result.best_balanced_acc = _number(validated["val_balanced_acc"].max())


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def data_text(dataset: str, folder: str = "") -> str:
    """A stage's data set as reports name it: ``caltech101``, or ``imagefolder pets`` with its folder's name."""
    return f"{dataset} {folder}" if folder else dataset


# ----------------------------------------------------------------------------------------------- classes
@dataclass
class ClassChange:
    """One class in both runs: its size (training images of run A's stage, else B's), accuracies and change."""

    name: str
    train_count: int | None
    val_count: int
    acc_a: float | None
    acc_b: float | None

    @property
    def delta(self) -> float | None:
        """Accuracy of B minus accuracy of A (None when either has no validation image of the class)."""
        return None if self.acc_a is None or self.acc_b is None else self.acc_b - self.acc_a


def _exact(delta: float) -> float:
    """A change without float noise: 3/5 - 2/5 and 2/5 - 1/5 are the same 20 points, ties are ties."""
    return round(delta, 9)


@dataclass
class ClassComparison:
    """Per-class accuracy of run B against run A; ``message`` says why there are no classes when there are none,
    or what was left out (classes that only one of the two stages has)."""

    run_a: str
    run_b: str
    stage_a: int | None = None
    stage_b: int | None = None
    dataset_a: str = ""
    dataset_b: str = ""
    folder_a: str = ""  # image folders' folder names (RunRows.data_folder)
    folder_b: str = ""
    classes: list[ClassChange] = field(default_factory=list)
    message: str | None = None

    @property
    def data_a(self) -> str:
        return data_text(self.dataset_a, self.folder_a)

    @property
    def data_b(self) -> str:
        return data_text(self.dataset_b, self.folder_b)

    def gains(self, k: int) -> list[ClassChange]:
        """The ``k`` classes B improved most (largest positive change first; ties by class name)."""
        better = [c for c in self.classes if c.delta is not None and _exact(c.delta) > 0]
        return sorted(better, key=lambda c: (-_exact(c.delta), c.name))[:max(0, k)]

    def losses(self, k: int) -> list[ClassChange]:
        """The ``k`` classes B got most worse at (largest drop first; ties by class name)."""
        worse = [c for c in self.classes if c.delta is not None and _exact(c.delta) < 0]
        return sorted(worse, key=lambda c: (_exact(c.delta), c.name))[:max(0, k)]

    def summary(self) -> dict[str, Any]:
        """How many classes got better, worse or stayed, and the mean change (the change in balanced accuracy
        over the shared classes)."""
        deltas = [_exact(c.delta) for c in self.classes if c.delta is not None]
        return {"classes": len(self.classes), "better": sum(d > 0 for d in deltas), "worse": sum(d < 0 for d in deltas),
                "same": sum(d == 0 for d in deltas), "unscored": len(self.classes) - len(deltas),
                "mean_change": sum(deltas) / len(deltas) if deltas else None}

    def counts_text(self) -> str:
        """The summary's counts in words: '5 classes: 3 better, 1 worse, 1 the same' (and any not compared)."""
        s = self.summary()
        text = (f"{s['classes']} class{'es' * (s['classes'] != 1)}: {s['better']} better, {s['worse']} worse, "
                f"{s['same']} the same")
        return text + (f", {s['unscored']} without validation images in one run or both" if s["unscored"] else "")

    def frame(self) -> pd.DataFrame:
        """One row per class: class, train images, val images, accuracy A, accuracy B, change (NaN when unknown)."""
        return pd.DataFrame({
            "class": [c.name for c in self.classes],
            "train images": [math.nan if c.train_count is None else c.train_count for c in self.classes],
            "val images": [c.val_count for c in self.classes],
            "accuracy A": [math.nan if c.acc_a is None else c.acc_a for c in self.classes],
            "accuracy B": [math.nan if c.acc_b is None else c.acc_b for c in self.classes],
            "change": [math.nan if c.delta is None else c.delta for c in self.classes],
        }, columns=["class", "train images", "val images", "accuracy A", "accuracy B", "change"])

    def to_dict(self, top: int) -> dict[str, Any]:
        """JSON-ready: every class with its change, the summary and the top gains and losses (class names)."""
        data = asdict(self)
        for record, change in zip(data["classes"], self.classes):
            record["delta"] = change.delta
        data["summary"] = self.summary()
        data["gains"] = [c.name for c in self.gains(top)]
        data["losses"] = [c.name for c in self.losses(top)]
        return data


def class_comparison(run_a: str, result_a: Mapping[str, Any], run_b: str, result_b: Mapping[str, Any],
                     label_a: str = "", label_b: str = "") -> ClassComparison:
    """Match two class results (``RunStore.class_results`` dicts) by class name, in run A's class order.

    ``label_a``/``label_b`` name the stages in the sentence given when they share no class.
    """
    names_a, names_b = list(result_a["classes"]), list(result_b["classes"])
    index_b = {name: i for i, name in enumerate(names_b)}
    shared = [name for name in names_a if name in index_b]
    if not shared:
        return ClassComparison(run_a, run_b, message=(
            f"{label_a or run_a} and {label_b or run_b} share no class names "
            f"({len(names_a)} and {len(names_b)} classes), so they cannot be compared class by class."))
    changes = []
    for i, name in enumerate(names_a):
        j = index_b.get(name)
        if j is None:
            continue
        changes.append(ClassChange(name, _train_count(result_a, i, result_b, j), int(result_a["val_counts"][i]),
                                   result_a["per_class_acc"][i], result_b["per_class_acc"][j]))
    left_out = len(names_a) + len(names_b) - 2 * len(shared)
    message = None if not left_out else (
        f"{left_out} class{'es' if left_out > 1 else ''} that only one of the two stages has "
        f"{'were' if left_out > 1 else 'was'} left out; {len(shared)} shared classes are compared.")
    return ClassComparison(run_a, run_b, classes=changes, message=message)


def _train_count(result_a: Mapping[str, Any], i: int, result_b: Mapping[str, Any], j: int) -> int | None:
    for result, k in ((result_a, i), (result_b, j)):
        counts = result.get("train_counts")
        if counts is not None and counts[k] is not None:
            return int(counts[k])
    return None


def compare_classes(store: RunStore, run_a: str, run_b: str, stage: int | None = None) -> ClassComparison:
    """Per-class accuracy of ``run_b`` against ``run_a`` on stage ``stage`` (from 1) of both runs, or, by default,
    on each run's last stage that has per-class results (a one-stage run from scratch against the last stage of
    a staged pipeline). Uses the last validated epoch of each stage."""
    return _compare_classes(RunRows.load(store, run_a), RunRows.load(store, run_b), stage)


def _compare_classes(rows_a: RunRows, rows_b: RunRows, stage: int | None) -> ClassComparison:
    picked = []
    for rows in (rows_a, rows_b):
        index, problem = _pick_stage(rows, stage)
        if problem:
            return ClassComparison(rows_a.name, rows_b.name, message=problem)
        picked.append(index)
    pair = (rows_a, rows_b)
    datasets = [rows.stages[i]["dataset"] for rows, i in zip(pair, picked)]
    folders = [rows.data_folder(i) for rows, i in zip(pair, picked)]
    labels = [f"stage {i + 1} of {rows.name} ({data_text(dataset, folder)})"
              for rows, i, dataset, folder in zip(pair, picked, datasets, folders)]
    comparison = class_comparison(rows_a.name, rows_a.class_result(picked[0]), rows_b.name,
                                  rows_b.class_result(picked[1]), *labels)
    comparison.stage_a, comparison.stage_b = picked[0] + 1, picked[1] + 1
    comparison.dataset_a, comparison.dataset_b = datasets
    comparison.folder_a, comparison.folder_b = folders
    return comparison


ENDED_EARLY = {"failed": "it failed", "stopped": "it was stopped", "interrupted": "it was interrupted"}


def _why_none(state: str) -> str:
    """Why a run has no per-class results, after 'has no per-class results'."""
    if state in ENDED_EARLY:
        return f": {ENDED_EARLY[state]} before its first epoch ended"
    return " yet: they are stored at the end of every epoch" if state in ACTIVE_STATES else ""


def _pick_stage(rows: RunRows, stage: int | None) -> tuple[int, str | None]:
    """(0-based stage index, None) or (-1, the sentence saying why the run has nothing to compare there)."""
    with_results = rows.class_stages
    if stage is None:
        if not with_results:
            return -1, f"Run {rows.name} has no per-class results{_why_none(rows.state)}."
        return with_results[-1], None
    count = rows.stage_count
    if not 1 <= stage <= count:
        return -1, f"Run {rows.name} has no stage {stage}: it has {count} stage{'s' * (count != 1)}."
    if stage - 1 not in with_results:
        return -1, f"Run {rows.name} has no per-class results for stage {stage}."
    return stage - 1, None


# --------------------------------------------------------------------------------------------- all of it
@dataclass
class Comparison:
    """Two or more runs compared: configs, per-stage results, per-class changes of every later run against the
    first, and the epoch metric frames (``RunStore.metrics_frame``) with stage names for overlaid curves."""

    runs: list[str]
    config: list[ConfigRow]
    stages: list[StageResult]
    classes: list[ClassComparison]
    curves: dict[str, pd.DataFrame]
    stage_names: dict[str, list[str]]

    def differences(self) -> list[ConfigRow]:
        return [row for row in self.config if row.differs]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """JSON-ready (without the curves, which ``python -m train export`` gives in full)."""
        return {"runs": self.runs,
                "config": [asdict(row) for row in self.config],
                "stages": [asdict(s) for s in self.stages],
                "classes": [c.to_dict(top) for c in self.classes]}


def compare_runs(store: RunStore, runs: Sequence[str], stage: int | None = None) -> Comparison:
    """Compare ``runs`` (at least two different ones; unknown names raise ``RunNotFound``)."""
    runs = list(dict.fromkeys(runs))
    if len(runs) < 2:
        raise CompareError("Comparing needs at least two different runs.")
    if stage is not None and stage < 1:
        raise CompareError(f"Stages are numbered from 1; there is no stage {stage}.")
    rows = {run: RunRows.load(store, run) for run in runs}
    return Comparison(
        runs=runs,
        config=config_rows({run: r.config for run, r in rows.items()}),
        stages=[s for r in rows.values() for s in _stage_results(r)],
        classes=[_compare_classes(rows[runs[0]], rows[other], stage) for other in runs[1:]],
        curves={run: r.epochs for run, r in rows.items()},
        stage_names={run: stage_names(r.config) for run, r in rows.items()},
    )


def stage_names(config: Mapping[str, Any] | None) -> list[str]:
    """Names of all a run's stages, from its config (the store lists a stage only once it starts)."""
    stages = (config or {}).get("stages") or []
    return [s.get("name") or f"stage{i + 1}" for i, s in enumerate(stages)]
