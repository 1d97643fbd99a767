"""Monitor: live training curves of one or several runs, with stage boundaries, smoothing and progress/ETA."""
from __future__ import annotations

from typing import Any

import streamlit as st

from core import charts
from core.compare import stage_names
from pages import common

common.setup("Monitor")

LIVE_REFRESH_S = 2.0
EPOCH_PANELS = (  # (title, metrics, log y, rows): the learning rate changes every step, so it is drawn per step
    ("Loss", ("train_loss", "val_loss"), False, "epoch"),
    ("Accuracy", ("train_acc", "val_acc", "val_balanced_acc"), False, "epoch"),
    ("Learning rate (per step)", ("lr",), False, "step"),
    ("Throughput (images/s)", ("images_per_s",), False, "epoch"),
)
STEP_PANELS = (("Training loss per step", ("train_loss",), False, "step"),
               ("Learning rate per step", ("lr",), False, "step"))


def pick_runs(runs: list[dict[str, Any]]) -> list[str]:
    names = [r["name"] for r in runs]
    wanted = [n for n in st.session_state.get("monitor_runs", []) if n in names]
    live = [r["name"] for r in runs if common.is_live(r)]
    store = common.store()
    with_metrics = (n for n in names if store.has_metrics(n))
    default = wanted or live[:1] or [next(with_metrics, names[0])]
    picked = st.multiselect("Runs (several overlay for comparison)", names, default=default, key="monitor_pick")
    st.session_state["monitor_runs"] = picked  # Streamlit forgets a widget's value on another page; this stays
    return picked


def eta_text(seconds: float | None) -> str:
    """The trainer's ETA, or 'estimating...' until its step time is steady."""
    return "estimating..." if seconds is None else charts.format_eta(seconds)


def progress(run: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    """Progress bars with the trainer's ETAs (heartbeat): the running stage's and the whole pipeline's."""
    index = run.get("stage")
    speed = f", {charts.format_rate(run['images_per_s'])} images/s" if run.get("images_per_s") else ""
    st.markdown(f"**{run['name']}** · {common.badge(run['state'])}{speed}")
    total = max(len(stage_names(run.get("config"))), len(stages))
    if index is not None and index < len(stages):
        stage = stages[index]
        done = (run.get("step"), run.get("stage_steps")) if run.get("stage_steps") else \
            (stage["completed_epochs"], stage["epochs"])  # a store written before stage_steps was reported
        st.progress(charts.progress_fraction(*done),
                    text=f"Stage {index + 1} of {total} ({stage['name']}): epoch {run.get('epoch') or 1} "
                         f"of {stage['epochs']}; ETA {eta_text(run.get('stage_eta_s'))}")
    st.progress(charts.progress_fraction(run.get("done_steps"), run.get("total_steps")),
                text=f"Pipeline: step {run.get('done_steps') or 0} of {run.get('total_steps') or '?'}; "
                     f"ETA {eta_text(run.get('eta_s'))}")
    if run.get("phase") == "compiling" and common.is_live(run):
        st.info("Compiling the model (torch.compile): a stage's first steps take up to a minute or two while "
                "the kernels are built. This is not a hang; the steps after it are faster.", icon=":material/build:")
    gpu_line(run)


def gpu_line(run: dict[str, Any]) -> None:
    """Memory and utilisation of the run's GPU, as its trainer last reported them (only when it has one)."""
    for gpu in run.get("gpu") or []:
        used, total = gpu.get("memory_used"), gpu.get("memory_total")
        parts = [f"memory {used / 2**30:.1f} of {total / 2**30:.0f} GiB"] if used is not None and total else []
        if gpu.get("utilization") is not None:
            parts.append(f"utilisation {gpu['utilization']:.0f}%")
        st.caption(f"GPU {gpu.get('index', 0)} ({gpu.get('name', 'CUDA')}): {' · '.join(parts)}")


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
    waiting = [name for name, f in frames.items() if f.empty] if not per_step else []
    if waiting:
        st.caption(f"{', '.join(waiting)}: no epoch has finished yet; choose per step to see "
                   f"{'its' if len(waiting) == 1 else 'their'} curves.")
    kind = "step" if per_step else "epoch"
    by_kind = {kind: frames}
    names = {r["name"]: stage_names(r.get("config")) for r in runs}
    cols = st.columns(2)
    for i, (title, metrics, log_y, rows) in enumerate(STEP_PANELS if per_step else EPOCH_PANELS):
        if rows not in by_kind:
            by_kind[rows] = {r["name"]: store.metrics_frame(r["name"], rows) for r in runs}
        fig = charts.curves_figure(by_kind[rows], metrics, x_column=rows,
                                   smoothing=smoothing, stage_names=names, title=title, log_y=log_y)
        cols[i % 2].plotly_chart(fig, width="stretch", key=f"chart-{kind}-{i}")


def live_view(names: list[str], per_step: bool, smoothing: float, was_live: bool) -> None:
    store = common.store()
    by_name = {r["name"]: r for r in store.list_runs()}
    runs = [by_name[n] for n in names if n in by_name]  # a run deleted meanwhile (another tab, the CLI) is left out
    if not runs:
        st.info("The chosen runs were deleted.")
        return
    if was_live and not any(common.is_live(r) for r in runs):
        st.rerun(scope="app")  # nothing live any more: one full rerun turns the refresh off
    for run in runs:
        if common.is_live(run):
            progress(run, store.stages(run["name"]))
        elif run["state"] == "failed":
            common.show_run_error(run.get("error") or "failed", prefix=f"{run['name']}: ")
        else:
            common.show_stopped(run, store.stages(run["name"]), prefix=f"**{run['name']}** · {run['state']}: ",
                                suffix=" (Resume is on the Train page.)")
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
