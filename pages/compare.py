"""Compare: two or more runs side by side (from the run store): the config keys that differ, final and best
accuracy per stage, per-class accuracy of one run against another, and the curves overlaid."""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core import charts
from core.compare import ClassComparison, Comparison, compare_runs, stage_names
from pages import common

common.setup("Compare")

CURVE_PANELS = (
    ("Validation accuracy", ("val_acc",)),
    ("Validation balanced accuracy", ("val_balanced_acc",)),
    ("Loss", ("train_loss", "val_loss")),
)
PERCENT = st.column_config.NumberColumn(format="percent")


def pick_runs(runs: list[dict[str, Any]]) -> list[str]:
    names = [r["name"] for r in runs]
    store = common.store()
    with_metrics = [n for n in names if store.has_metrics(n)]
    default = (with_metrics + [n for n in names if n not in with_metrics])[:2][::-1]  # the older one is the baseline
    return st.multiselect("Runs (the first one is the baseline the others are set against)", names,
                          default=default, key="compare_pick")


def pick_stage(runs: list[dict[str, Any]]) -> int | None:
    most = max((len(stage_names(r["config"])) for r in runs), default=1)
    return st.selectbox("Stage for the per-class comparison", [None, *range(1, most + 1)],
                        format_func=lambda s: "the last stage of each run" if s is None else f"stage {s} of every run",
                        help="A one-stage run from scratch is best set against the last stage of a staged pipeline.")


def config_view(comparison: Comparison) -> None:
    st.subheader("Configuration")
    only = st.toggle("Only the keys that differ", value=True)
    frame = charts.config_frame(comparison.config, only_differences=only)
    differing = int(sum(r.differs for r in comparison.config))
    st.caption(f"{differing} of {len(comparison.config)} keys differ (highlighted). Stages are numbered from 1.")
    if frame.empty:
        st.info("The configs are identical.")
        return
    common.table(charts.highlight_differences(frame), hide_index=False, height=min(560, 38 + 35 * len(frame)))


def stages_view(comparison: Comparison) -> None:
    st.subheader("Results per stage")
    frame = charts.stage_results_frame(comparison.stages)
    common.table(frame, column_config={c: PERCENT for c in ("final acc", "final balanced acc", "best acc",
                                                         "best balanced acc")})


def classes_view(comparison: Comparison) -> None:
    st.subheader("Per class")
    baseline, others = comparison.runs[0], comparison.runs[1:]
    other = st.selectbox(f"Run set against {baseline}", others) if len(others) > 1 else others[0]
    result = next(c for c in comparison.classes if c.run_b == other)
    if not result.classes:
        st.info(result.message or "Nothing to compare class by class.")
        return
    st.caption(f"{other}: stage {result.stage_b} ({result.data_b}) against {baseline}: stage {result.stage_a} "
               f"({result.data_a}). {result.counts_text()}. " + (result.message or ""))
    frame = result.frame()
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.class_scatter_figure(frame, baseline, other), width="stretch")
    with right:
        top = st.slider("Classes listed", 1, min(30, len(frame)), min(10, len(frame))) if len(frame) > 1 else 1
        changes_table("Biggest gains", result, [c.name for c in result.gains(top)], frame)
        changes_table("Biggest losses", result, [c.name for c in result.losses(top)], frame)


def changes_table(title: str, result: ClassComparison, names: list[str], frame: pd.DataFrame) -> None:
    st.markdown(f"**{title}**")
    if not names:
        st.caption("None.")
        return
    rows = frame.set_index("class").loc[names].reset_index()
    shown = rows[["class", "train images", "accuracy A", "accuracy B", "change"]]  # headed by the run names below
    common.table(shown.assign(change=shown["change"] * 100), column_config={
        "accuracy A": st.column_config.NumberColumn(result.run_a, format="percent"),
        "accuracy B": st.column_config.NumberColumn(result.run_b, format="percent"),
        "change": st.column_config.NumberColumn("change (points)", format="%+.1f"),
        "train images": st.column_config.NumberColumn(format="%d")})


def curves_view(comparison: Comparison) -> None:
    st.subheader("Curves")
    if all(frame.empty for frame in comparison.curves.values()):
        st.info("These runs have no finished epoch to draw.")
        return
    cols = st.columns(len(CURVE_PANELS))
    for col, (title, metrics) in zip(cols, CURVE_PANELS):
        fig = charts.curves_figure(comparison.curves, metrics, stage_names=comparison.stage_names, title=title)
        col.plotly_chart(fig, width="stretch")


@st.cache_data(show_spinner="Comparing...", max_entries=16)
def comparison_of(names: tuple[str, ...], stage: int | None, updated: tuple[Any, ...]) -> Any:
    """``compare_runs`` once per choice of runs and stage; ``updated`` (the runs' last change) keys the cache,
    so the page's toggles and sliders do not query the store again."""
    return compare_runs(common.store(), list(names), stage)


def body() -> None:
    st.title("Compare")
    runs = common.store().list_runs()
    if len(runs) < 2:
        st.info("Comparing needs at least two runs; " + ("there is one so far." if runs else "there are none yet.")
                + " Train them on the Train page.")
        return
    names = pick_runs(runs)
    if len(names) < 2:
        st.caption("Choose at least two runs.")
        return
    stage = pick_stage([r for r in runs if r["name"] in names])
    updated = tuple(next(r.get("updated") for r in runs if r["name"] == n) for n in names)
    comparison = comparison_of(tuple(names), stage, updated)
    config_view(comparison)
    stages_view(comparison)
    classes_view(comparison)
    curves_view(comparison)


common.run_page(body, "The Compare page")
