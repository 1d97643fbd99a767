"""Monitor: live training curves of one or several runs, with stage boundaries, smoothing and progress/ETA."""
from __future__ import annotations

from typing import Any

import streamlit as st

from core import charts
from pages import common

common.setup("Monitor")

LIVE_REFRESH_S = 2.0
EPOCH_PANELS = (
    ("Loss", ("train_loss", "val_loss"), False),
    ("Accuracy", ("train_acc", "val_acc", "val_balanced_acc"), False),
    ("Learning rate", ("lr",), False),
    ("Throughput (images/s)", ("images_per_s",), False),
)
STEP_PANELS = (("Training loss per step", ("train_loss",), False), ("Learning rate per step", ("lr",), False))


def pick_runs(runs: list[dict[str, Any]]) -> list[str]:
    names = [r["name"] for r in runs]
    wanted = [n for n in st.session_state.get("monitor_runs", []) if n in names]
    live = [r["name"] for r in runs if common.is_live(r)]
    store = common.store()
    with_metrics = (n for n in names if store.has_metrics(n))
    default = wanted or live[:1] or [next(with_metrics, names[0])]
    return st.multiselect("Runs (several overlay for comparison)", names, default=default, key="monitor_pick")


def stage_names(run: dict[str, Any]) -> list[str]:
    """Names of all the run's stages, from its config (the store lists a stage only once it starts)."""
    stages = (run.get("config") or {}).get("stages") or []
    return [s.get("name") or f"stage{i + 1}" for i, s in enumerate(stages)]


def progress(run: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    """Progress bar and ETA of the running stage (from its epochs) and of the whole pipeline (heartbeat)."""
    import time

    index = run.get("stage")
    speed = f", {run['images_per_s']:.0f} images/s" if run.get("images_per_s") else ""
    st.markdown(f"**{run['name']}** · {common.badge(run['state'])}{speed}")
    total = max(len(stage_names(run)), len(stages))
    if index is not None and index < len(stages):
        stage = stages[index]
        frame = common.store().metrics_frame(run["name"], "epoch", stage=index)
        into = time.time() - float(frame["time"].max()) if not frame.empty else 0.0
        eta = charts.stage_eta(frame["epoch_time_s"].tolist(), stage["completed_epochs"], stage["epochs"], into)
        st.progress(charts.progress_fraction(stage["completed_epochs"], stage["epochs"]),
                    text=f"Stage {index + 1} of {total} ({stage['name']}): epoch {run.get('epoch') or 1} "
                         f"of {stage['epochs']}; ETA {charts.format_eta(eta)}")
    st.progress(charts.progress_fraction(run.get("done_steps"), run.get("total_steps")),
                text=f"Pipeline: step {run.get('done_steps') or 0} of {run.get('total_steps') or '?'}; "
                     f"ETA {charts.format_eta(run.get('eta_s'))}")


def panels(runs: list[dict[str, Any]], per_step: bool, smoothing: float) -> None:
    store = common.store()
    frames = {r["name"]: store.metrics_frame(r["name"], "step" if per_step else "epoch") for r in runs}
    if not per_step and all(f.empty for f in frames.values()):
        frames = {r["name"]: store.metrics_frame(r["name"], "step") for r in runs}
        if any(not f.empty for f in frames.values()):
            st.caption("No epoch has finished yet: these are the per-step curves.")
            per_step = True
    if all(f.empty for f in frames.values()):
        st.info("No metrics yet: the first ones appear after the first steps of training.")
        return
    kind = "step" if per_step else "epoch"
    names = {r["name"]: stage_names(r) for r in runs}
    cols = st.columns(2)
    for i, (title, metrics, log_y) in enumerate(STEP_PANELS if per_step else EPOCH_PANELS):
        fig = charts.curves_figure(frames, metrics, x_column="step" if per_step else "epoch",
                                   smoothing=smoothing, stage_names=names, title=title, log_y=log_y)
        cols[i % 2].plotly_chart(fig, width="stretch", key=f"chart-{kind}-{i}")


def live_view(names: list[str], per_step: bool, smoothing: float, was_live: bool) -> None:
    store = common.store()
    runs = [store.get_run(n) for n in names]
    if was_live and not any(common.is_live(r) for r in runs):
        st.rerun(scope="app")  # nothing live any more: one full rerun turns the refresh off
    for run in runs:
        if common.is_live(run):
            progress(run, store.stages(run["name"]))
        elif run["state"] == "failed":
            st.error(f"{run['name']}: {run.get('error') or 'failed'}")
    panels(runs, per_step, smoothing)


def body() -> None:
    st.title("Monitor")
    runs = common.store().list_runs()
    if not runs:
        st.info("No runs yet. Launch one on the Train page (or the demo from Home).")
        return
    names = pick_runs(runs)
    if not names:
        st.caption("Choose at least one run.")
        return
    left, right = st.columns([1, 2])
    per_step = left.segmented_control("Points", ["per epoch", "per step"], default="per epoch") == "per step"
    smoothing = right.slider("Smoothing", 0.0, 0.99, 0.6 if per_step else 0.0, 0.01,
                             help="Exponential moving average, as in TensorBoard; the raw curve stays faint.")
    live = any(common.is_live(r) for r in runs if r["name"] in names)
    st.fragment(guarded_live_view, run_every=LIVE_REFRESH_S if live else None)(names, per_step, smoothing, live)
    take_away(names)


EXPORT_FORMATS = {"TorchScript (torch only)": "torchscript", "ONNX (onnxruntime)": "onnx",
                  "safetensors (weights)": "safetensors"}


def take_away(names: list[str]) -> None:
    """Per run with a best checkpoint: the model exported (model + model.json + predict.py) as a zip."""
    from pathlib import Path

    from train.export_model import export_zip

    store = common.store()
    best = {n: Path(s["best_path"]) for n in names for s in store.stages(n)[-1:] if s.get("best_path")}
    best = {n: p for n, p in best.items() if p.is_file()}
    if not best:
        return
    st.subheader("Take the model away")
    fmt = EXPORT_FORMATS[st.segmented_control("Format", list(EXPORT_FORMATS), default=list(EXPORT_FORMATS)[0],
                                              key="export_format") or list(EXPORT_FORMATS)[0]]
    st.caption("The latest stage's best model in eval mode, with model.json (preprocessing and class names) and a "
               "small predict.py; the same as `python -m train export-model CHECKPOINT --format ...`.")
    cols = st.columns(min(3, len(best)))
    for i, (name, path) in enumerate(best.items()):
        cols[i % len(cols)].download_button(
            f"Download {name} ({fmt})", lambda p=path: export_zip(p, fmt), file_name=f"{name}-{fmt}.zip",
            mime="application/zip", icon=":material/download:", key=f"export-{name}", on_click="ignore")


def guarded_live_view(names: list[str], per_step: bool, smoothing: float, was_live: bool) -> None:
    """The refreshing part; a fragment reruns on its own, so it shows its own errors."""
    with common.shown_errors("The live view"):
        live_view(names, per_step, smoothing, was_live)


common.run_page(body, "The Monitor page")
