"""Plotly figures and tables for the app's pages, built from run-store rows (pure functions, no Streamlit).

Metric frames are those of ``RunStore.metrics_frame``: columns ``stage``, ``epoch``, ``step`` and one
column per metric. Per-class results are the dicts of ``RunStore.class_results`` / ``train eval``:
``classes``, ``train_counts``, ``val_counts``, ``correct``, ``confusion`` (rows true, columns predicted).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

METRIC_LABELS = {
    "train_loss": "train loss",
    "val_loss": "validation loss",
    "train_acc": "train accuracy",
    "val_acc": "validation accuracy",
    "val_balanced_acc": "validation balanced accuracy",
    "lr": "learning rate",
    "images_per_s": "images/s",
}
SHARES = {"train_acc", "val_acc", "val_balanced_acc"}  # metrics between 0 and 1
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are skipped, not spread.

    ``weight`` 0 returns the values unchanged; 0.99 is very smooth. This is pandas' ``ewm(adjust=True)``, which
    divides by the weights seen so far: the same as TensorBoard's division by ``1 - weight ** n``.
    """
    if not 0 <= weight < 1:
        raise ValueError("smoothing weight must be in [0, 1)")
    raw = np.asarray(values, dtype=float)
    out = pd.Series(raw).ewm(alpha=1 - weight, adjust=True, ignore_na=True).mean().to_numpy().copy()
    out[np.isnan(raw)] = np.nan
    return out


MAX_POINTS = 2000  # per drawn curve: a half-width chart is ~700 px wide, so more points only cost bytes


def thinned(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve: in each of ``max_points / 2`` runs of consecutive points, its
    lowest and highest (so a spike stays visible), plus the first and last point. Short curves are unchanged."""
    n = len(y)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, max_points // 2 - 1, dtype=int)
    finite = np.where(np.isnan(y), np.inf, y), np.where(np.isnan(y), -np.inf, y)
    lows = [a + int(np.argmin(finite[0][a:b])) for a, b in zip(edges[:-1], edges[1:])]
    highs = [a + int(np.argmax(finite[1][a:b])) for a, b in zip(edges[:-1], edges[1:])]
    keep = np.unique(np.array([0, n - 1, *lows, *highs]))
    return np.asarray(x)[keep], y[keep]


def global_x(frame: pd.DataFrame, column: str) -> pd.Series:
    """``column`` made monotonic through the pipeline's stages.

    Epochs are renumbered 1, 2, ... across stages (each stage continues after the previous one);
    steps are shifted only when a stage restarts counting.
    """
    x = frame[column].astype(float)
    out = x.copy()
    end: float | None = None
    for stage in sorted(frame["stage"].unique()):
        mask = frame["stage"] == stage
        first = x[mask].min()
        if column == "epoch":
            shift = (end or 0.0) + 1 - first
        else:
            shift = 0.0 if end is None or first > end else end + 1 - first
        out[mask] = x[mask] + shift
        end = float(out[mask].max())
    return out


def stage_boundaries(frame: pd.DataFrame, x: pd.Series) -> list[tuple[float, int]]:
    """(x where a stage starts, stage index) for every stage after the first."""
    if frame.empty:
        return []
    starts = x.groupby(frame["stage"]).min().sort_index()
    return [(float(v), int(s)) for s, v in starts.iloc[1:].items()]


def curves_figure(
    frames: Mapping[str, pd.DataFrame],
    metrics: Sequence[str],
    x_column: str = "epoch",
    smoothing: float = 0.0,
    stage_names: Mapping[str, Sequence[str]] | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> go.Figure:
    """Curves of ``metrics`` for several runs overlaid; stage starts marked with dotted lines.

    ``frames`` maps a run name to its metric frame. With smoothing, the raw curve stays as a faint line.
    """
    fig = go.Figure()
    dashes = ("solid", "dash", "dot", "dashdot")
    for r, (run, frame) in enumerate(frames.items()):
        if frame.empty:
            continue
        frame = frame.sort_values(["stage", "epoch", "step"])
        x = global_x(frame, x_column)
        colour = _PALETTE[r % len(_PALETTE)]
        for m, metric in enumerate(metrics):
            if metric not in frame or frame[metric].isna().all():
                continue
            label = f"{run} · {METRIC_LABELS.get(metric, metric)}" if len(frames) > 1 else METRIC_LABELS.get(metric, metric)
            y = frame[metric].astype(float).to_numpy()
            dash = dashes[m % len(dashes)]
            line_colour = colour if len(frames) > 1 else _PALETTE[m % len(_PALETTE)]
            if smoothing > 0:
                xs, ys = thinned(x.to_numpy(), y)
                fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(color=line_colour, width=1, dash=dash),
                                opacity=0.25, showlegend=False, hoverinfo="skip")
                stages = frame["stage"].to_numpy()  # each stage smoothed on its own: a new stage is a new curve
                y = np.concatenate([ema(y[stages == s], smoothing) for s in pd.unique(stages)])
            xs, ys = thinned(x.to_numpy(), y)
            fig.add_scatter(x=xs, y=ys, name=label, mode="lines+markers" if len(x) < 40 else "lines",
                            line=dict(color=line_colour, dash=dash), connectgaps=True)
        names = list((stage_names or {}).get(run, []))
        for start, stage in stage_boundaries(frame, x):
            text = names[stage] if stage < len(names) else f"stage {stage + 1}"
            fig.add_vline(x=start - 0.5 if x_column == "epoch" else start, line_dash="dot", line_color="grey",
                          annotation_text=text, annotation_position="top left")
    rows = legend_rows(sum(t.showlegend is not False for t in fig.data))
    fig.update_layout(title=title, xaxis_title="epoch (through the pipeline)" if x_column == "epoch" else "step",
                      margin=dict(l=10, r=10, t=40 if title else 20, b=LEGEND_ROW_PX * (rows + 2)),
                      height=300 + LEGEND_ROW_PX * rows, hovermode="x unified",
                      # the legend sits at the bottom of the figure, under the axis title, in a margin sized for it
                      legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, x=0))
    if log_y:
        fig.update_yaxes(type="log")
    elif set(metrics) <= SHARES:
        fig.update_yaxes(range=share_range([y for t in fig.data for y in t.y if y is not None and np.isfinite(y)]))
    return fig


def share_range(values: Sequence[float], least: float = 0.1) -> list[float] | None:
    """A y range for accuracies: the values with a margin, at least ``least`` wide and within [0, 1] (plotly pads a
    flat line by its own units, so an accuracy of 1.0 throughout drew an axis up to 200%); None leaves it to plotly."""
    if not len(values):
        return None
    low, high = float(min(values)), float(max(values))
    pad = max(0.02, (high - low) * 0.05, (least - (high - low)) / 2)
    low, high = low - pad, high + pad
    if low < 0:
        low, high = 0.0, min(1.0, high - low)
    if high > 1:
        low, high = max(0.0, low - (high - 1)), 1.0
    return [low - 0.01, high + 0.01]  # room for a marker on the edge


LEGEND_ROW_PX = 22


def legend_rows(entries: int, per_row: int = 2) -> int:
    """Rows a horizontal legend of ``entries`` takes in a half-width panel (two 'run · metric' labels a row)."""
    return -(-entries // per_row)


def nice_log_ticks(low: float, high: float) -> list[float]:
    """Tick values 1, 2, 5 x 10^k between ``low`` and ``high`` (a log axis that reads '10 20 50 100')."""
    if not (low > 0 and high >= low):
        return []
    ticks = []
    for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks += [m * 10.0 ** power for m in (1, 2, 5) if low <= m * 10.0 ** power <= high]
    return ticks


def format_eta(seconds: float | None) -> str:
    """'1 h 02 min', '3 min 05 s', '12 s', or 'unknown'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def format_rate(value: float) -> str:
    """A speed with its meaningful digits: '1234', '12', '2.4', '0.42'."""
    return f"{value:.0f}" if value >= 9.95 else f"{value:.1f}" if value >= 0.995 else f"{value:.2f}"


def progress_fraction(done: int | None, total: int | None) -> float:
    """done/total clamped to [0, 1]; 0 when unknown."""
    if not done or not total or total <= 0:
        return 0.0
    return min(1.0, max(0.0, done / total))


# ----------------------------------------------------------------------------- classes


def per_class_frame(result: Mapping[str, Any]) -> pd.DataFrame:
    """One row per class: train and validation counts, correct, accuracy (= recall), precision and F1 (NaN where
    unknown; results stored before precision was recorded get it from their confusion matrix)."""
    classes = list(result["classes"])
    train = result.get("train_counts")
    from core.evaluation import per_class_f1, per_class_precision  # here: core.evaluation imports torch

    precision = result.get("precision") or per_class_precision(result["confusion"])
    f1 = result.get("f1") or per_class_f1(precision, result["per_class_acc"])

    def column(values: Sequence[float | None]) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in values], dtype=float)

    return pd.DataFrame({
        "class": classes,
        "train images": np.asarray(train, dtype=float) if train is not None else np.full(len(classes), np.nan),
        "val images": np.asarray(result["val_counts"], dtype=float),
        "correct": np.asarray(result["correct"], dtype=float),
        "accuracy": column(result["per_class_acc"]),
        "precision": column(precision),
        "F1": column(f1),
    })

def imbalance_ratio(counts: Sequence[float]) -> float:
    """Largest class over smallest non-empty class (NaN when there is nothing to compare)."""
    values = [float(c) for c in counts if c is not None and not math.isnan(float(c)) and float(c) > 0]
    return max(values) / min(values) if values else float("nan")


def accuracy_vs_size_figure(frame: pd.DataFrame) -> go.Figure:
    """Per-class accuracy against the class's number of training images (log x): does the long tail hurt?"""
    size_col = "train images" if frame["train images"].notna().any() else "val images"
    data = frame.dropna(subset=["accuracy"])
    fig = go.Figure(go.Scatter(
        x=data[size_col], y=data["accuracy"], mode="markers", text=data["class"],
        marker=dict(size=8, opacity=0.7),
        hovertemplate="%{text}<br>" + size_col + ": %{x:.0f}<br>accuracy: %{y:.1%}<extra></extra>",
    ))
    if len(data) >= 2 and data[size_col].nunique() > 1:
        logx = np.log10(data[size_col].clip(lower=1).to_numpy(dtype=float))
        slope, intercept = np.polyfit(logx, data["accuracy"].to_numpy(dtype=float), 1)
        xs = np.linspace(logx.min(), logx.max(), 20)
        fig.add_scatter(x=10 ** xs, y=intercept + slope * xs, mode="lines", name="trend",
                        line=dict(dash="dash", color="grey"), hoverinfo="skip")
    fig.update_layout(xaxis_title=f"{size_col} (log scale)", yaxis_title="accuracy", showlegend=False,
                      height=340, margin=dict(l=10, r=10, t=20, b=10))
    sizes = data[size_col].clip(lower=1)
    ticks = nice_log_ticks(float(sizes.min()), float(sizes.max())) if len(sizes) else []
    if len(ticks) < 2 and len(sizes):  # a narrow range: label its ends as well
        ticks = sorted({*ticks, float(sizes.min()), float(sizes.max())})
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_yaxes(tickformat=".0%", range=[-0.02, 1.02])
    return fig


def most_confused_classes(confusion: Sequence[Sequence[float]], n: int) -> list[int]:
    """Indices of ``n`` classes for a sub-matrix: both classes of each most-confused pair in turn (so the pairs
    the page lists are in it), then the classes involved in the most errors (as true or predicted class)."""
    matrix = np.asarray(confusion, dtype=float)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    chosen: dict[int, None] = {}
    for flat in np.argsort(-off, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(off))
        if off[i, j] == 0 or len(chosen) >= n:
            break
        if len(chosen) + (i not in chosen) + (j not in chosen) <= n:
            chosen.update(dict.fromkeys((i, j)))
    involvement = off.sum(axis=0) + off.sum(axis=1)
    chosen.update(dict.fromkeys(int(i) for i in np.argsort(-involvement, kind="stable")))
    return list(chosen)[: min(n, len(off))]


LABEL_CHARS = 24  # class names on a confusion matrix's axes


def confusion_figure(
    confusion: Sequence[Sequence[float]],
    classes: Sequence[str],
    indices: Sequence[int] | None = None,
    normalize: bool = True,
    diagonal: bool = False,
) -> go.Figure:
    """Heatmap of the confusion matrix (restricted to ``indices`` when given), rows normalised to recall.

    Hover shows the true class, the predicted class, the count and the share of the true class's images,
    so a 257-class matrix stays readable when zoomed. Without ``diagonal`` the correct cells are left blank
    and the colour scale spans the errors only (otherwise the diagonal drowns them).
    """
    matrix = np.asarray(confusion, dtype=float)
    idx = list(range(len(classes))) if indices is None else list(indices)
    sub = matrix[np.ix_(idx, idx)]
    totals = matrix[idx].sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, sub / np.where(totals > 0, totals, 1), 0.0)
    names = [classes[i] for i in idx]
    z = (share if normalize else sub).astype(float)
    if not diagonal:
        for k, i in enumerate(idx):
            z[k, k] = np.nan
    top = np.nanmax(z) if np.isfinite(z).any() and np.nanmax(z) > 0 else 1.0
    counts = dict(text=_cell_text(sub, share, normalize, diagonal), texttemplate="%{text}") \
        if len(idx) <= COUNTS_UP_TO else {}
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, colorscale="Blues", zmin=0, zmax=top, hoverongaps=False, **counts,
        customdata=np.dstack([sub, share]),
        hovertemplate="true: %{y}<br>predicted: %{x}<br>count: %{customdata[0]:.0f}"
                      "<br>share of true class: %{customdata[1]:.1%}<extra></extra>",
        colorbar=dict(title="share" if normalize else "count"),
    ))
    ticks = dict(tickmode="array", tickvals=names, ticktext=[short_label(n) for n in names],
                 showticklabels=len(idx) <= 60)  # a long class name is cut on the axes (hover shows it whole)
    label_px = 6 * max((len(t) for t in ticks["ticktext"]), default=0)  # the rotated labels' height, roughly
    side = max(360, min(900, 18 * len(idx) + 160)) + (label_px if len(idx) <= 60 else 0)
    fig.update_layout(height=side, margin=dict(l=10, r=10, t=20, b=10),
                      xaxis=dict(title="predicted", tickangle=-60, **ticks),
                      yaxis=dict(title="true", autorange="reversed", **ticks))
    return fig


def short_label(name: str, length: int = LABEL_CHARS) -> str:
    """A class name cut to ``length`` characters for an axis, with an ellipsis where it was cut."""
    return name if len(name) <= length else name[: length - 1] + "…"


def _cell_text(counts: np.ndarray, shares: np.ndarray, normalize: bool, diagonal: bool) -> np.ndarray:
    """What each cell prints: what its colour shows (the share, or the count); the diagonal blank when hidden."""
    text = np.vectorize(lambda v: f"{v:.0%}")(shares) if normalize else counts.astype(int).astype(str)
    text = text.astype(object)
    if not diagonal:
        np.fill_diagonal(text, "")
    return text


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None) -> go.Figure:
    """The learning-rate range test: smoothed loss against learning rate (log x), the suggestion marked."""
    fig = go.Figure(go.Scatter(x=list(lrs), y=list(losses), mode="lines", name="smoothed training loss",
                               hovertemplate="lr %{x:.2e}<br>loss %{y:.4f}<extra></extra>"))
    if suggestion is not None:
        fig.add_vline(x=suggestion, line_dash="dash", line_color="#d62728",
                      annotation_text=f"suggested {suggestion:.1e}", annotation_position="top left")
    fig.update_layout(xaxis_title="learning rate (log scale)", yaxis_title="training loss (smoothed)", height=320,
                      margin=dict(l=10, r=10, t=30, b=10), showlegend=False)
    fig.update_xaxes(type="log", exponentformat="e")
    return fig


COUNTS_UP_TO = 30  # classes in a confusion matrix whose cells print their counts


def probabilities_frame(probabilities: Sequence[float], class_names: Sequence[str], k: int = 5) -> pd.DataFrame:
    """The top-``k`` classes with their probabilities, most likely first."""
    probs = np.asarray(probabilities, dtype=float)
    order = np.argsort(-probs, kind="stable")[:k]
    return pd.DataFrame({"rank": range(1, len(order) + 1),
                         "class": [class_names[i] for i in order],
                         "probability": probs[order]})


# ----------------------------------------------------------------------------- run comparison

STATIC_FORMATS = (".png", ".svg", ".pdf")


def config_frame(rows: Sequence[Any], only_differences: bool = False) -> pd.DataFrame:
    """Configs side by side from ``core.compare.ConfigRow``s: index = key, one text column per run, and a
    boolean ``differs`` column (a key one run lacks shows as an empty cell)."""
    chosen = [r for r in rows if r.differs or not only_differences]
    runs = list(rows[0].values) if rows else []
    frame = pd.DataFrame([{**{run: config_text(r.values[run]) for run in runs}, "differs": r.differs}
                          for r in chosen], index=pd.Index([r.key for r in chosen], name="key"),
                         columns=[*runs, "differs"])
    return frame.astype({"differs": bool})


def config_text(value: Any) -> str:
    """How a config value reads in a table: '' for a missing key, YAML-like words for the rest."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # short where that is exact, else every digit (0.00123456789 vs 0.00123456999)
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value, sort_keys=True)
    return str(value)


def highlight_differences(frame: pd.DataFrame, colour: str = "#fff3b0") -> "pd.io.formats.style.Styler":
    """A Styler of ``config_frame`` that shades the rows whose values differ and hides the ``differs`` column."""
    shade = f"background-color: {colour}; font-weight: 600"
    return frame.style.apply(lambda row: [shade if row["differs"] else ""] * len(row), axis=1) \
        .hide(["differs"], axis="columns")


def stage_results_frame(stages: Sequence[Any]) -> pd.DataFrame:
    """One row per (run, stage) from ``core.compare.StageResult``s; accuracies as fractions (NaN when unknown)."""
    columns = ["run", "stage", "name", "data set", "epochs", "final acc", "final balanced acc", "best acc",
               "best balanced acc", "best epoch"]
    return pd.DataFrame([{
        "run": s.run, "stage": s.stage, "name": s.name, "data set": s.data_set,
        "epochs": f"{s.completed_epochs}/{s.epochs}",
        "final acc": s.final_acc, "final balanced acc": s.final_balanced_acc,
        "best acc": s.best_acc, "best balanced acc": s.best_balanced_acc, "best epoch": s.best_epoch,
    } for s in stages], columns=columns).astype({c: float for c in columns[5:9]})


def _marker_sizes(counts: pd.Series, smallest: float = 6.0, largest: float = 26.0) -> np.ndarray:
    """Marker diameters whose area grows with the class size (all equal when sizes are unknown or equal)."""
    values = counts.astype(float).fillna(0).clip(lower=0).to_numpy()
    root = np.sqrt(values)
    if root.max() <= root.min():
        return np.full(len(values), (smallest + largest) / 2)
    return smallest + (root - root.min()) / (root.max() - root.min()) * (largest - smallest)


def _change_span(changes: pd.Series) -> float:
    """Half the width of the symmetric colour scale of changes: the largest change (at least 5 points)."""
    values = changes.abs().dropna()
    return max(0.05, float(values.max())) if not values.empty else 1.0


def class_scatter_figure(frame: pd.DataFrame, run_a: str, run_b: str) -> go.Figure:
    """Per-class accuracy of run B (y) against run A (x) from ``ClassComparison.frame()``: above the diagonal B is
    better; marker area grows with the class's training images, colour is the change (green up, red down)."""
    data = frame.dropna(subset=["accuracy A", "accuracy B"])
    size_note = "training images" if data["train images"].notna().any() else "validation images"
    sizes = data["train images"] if size_note == "training images" else data["val images"]
    span = _change_span(data["change"])
    fig = go.Figure(go.Scatter(
        x=data["accuracy A"], y=data["accuracy B"], mode="markers", text=data["class"],
        customdata=np.column_stack([sizes.to_numpy(dtype=float), data["change"].to_numpy(dtype=float)]),
        marker=dict(size=_marker_sizes(sizes), color=data["change"], colorscale="RdYlGn",
                    cmin=-span, cmax=span, opacity=0.75, line=dict(width=0.5, color="#444"),
                    colorbar=dict(title="change", tickformat="+.0%")),
        hovertemplate=f"%{{text}}<br>{size_note}: %{{customdata[0]:.0f}}<br>{run_a}: %{{x:.1%}}<br>"
                      f"{run_b}: %{{y:.1%}}<br>change: %{{customdata[1]:+.1%}}<extra></extra>",
        showlegend=False,
    ))
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="grey"), hoverinfo="skip",
                    showlegend=False)
    fig.update_layout(xaxis_title=f"{run_a}: per-class accuracy", yaxis_title=f"{run_b}: per-class accuracy",
                      height=460, margin=dict(l=10, r=10, t=30, b=10),
                      title=dict(text=f"above the line: {run_b} better · marker area: {size_note}", font_size=13))
    fig.update_xaxes(tickformat=".0%", range=[-0.03, 1.03])
    fig.update_yaxes(tickformat=".0%", range=[-0.03, 1.03], scaleanchor="x", scaleratio=1)
    return fig


def write_class_scatter(frame: pd.DataFrame, run_a: str, run_b: str, path: Any, label: int = 5) -> None:
    """Write the per-class scatter to ``path``: ``.html`` (the interactive plotly figure, offline) or a static
    ``.png``/``.svg``/``.pdf`` drawn with matplotlib (plotly's static export needs kaleido and a Chrome), with the
    ``label`` biggest gains and losses named. Raises ``ValueError`` for another suffix and ``ImportError`` when
    matplotlib is missing."""
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".html":
        class_scatter_figure(frame, run_a, run_b).write_html(path, include_plotlyjs=True)
        return
    if suffix not in STATIC_FORMATS:
        raise ValueError(f"a picture must end in .html, {', '.join(STATIC_FORMATS)}; got {path.name!r}")
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    data = frame.dropna(subset=["accuracy A", "accuracy B"])
    sizes = data["train images"] if data["train images"].notna().any() else data["val images"]
    span = _change_span(data["change"])
    fig = Figure(figsize=(6.4, 6.0), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    points = ax.scatter(data["accuracy A"], data["accuracy B"], s=_marker_sizes(sizes) ** 2 / 2,
                        c=data["change"], cmap="RdYlGn", vmin=-span, vmax=span, alpha=0.75, edgecolors="#444",
                        linewidths=0.4)
    fig.colorbar(points, ax=ax, label=f"change ({run_b} - {run_a})", shrink=0.8, format="{x:+.0%}")
    losses = data[data["change"] < 0].sort_values(["change", "class"]).head(label)
    gains = data[data["change"] > 0].sort_values(["change", "class"], ascending=[False, True]).head(label)
    for _, row in pd.concat([losses, gains]).iterrows():
        ax.annotate(row["class"], (row["accuracy A"], row["accuracy B"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), aspect="equal",
           xlabel=f"{run_a}: per-class accuracy", ylabel=f"{run_b}: per-class accuracy",
           title=f"{run_b} against {run_a} ({len(data)} classes; area = class size)")
    ax.title.set_fontsize(9)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.grid(alpha=0.3)
    fig.savefig(path, format=suffix[1:])
