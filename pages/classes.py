"""Classes: per-class results of any run's stage or any `train eval`, from the run store (no model runs),
plus a gallery of misclassified images with Grad-CAM on demand."""
from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from core import charts
from core.evaluation import confused_pairs
from core.run_store import ACTIVE_STATES, RunStore
from pages import cam, common

common.setup("Classes")

GALLERY_SIZE = 12


def pick_run_result() -> tuple[dict[str, Any] | None, list[dict[str, Any]], Path | None]:
    """(class result, misclassified samples, checkpoint) of a chosen run, stage and epoch."""
    store = common.store()
    runs = [r["name"] for r in store.list_runs()]
    if not runs:
        st.info("No runs yet: train one on the Train page.")
        return None, [], None
    a, b, c = st.columns(3)
    with_stages = next((i for i, name in enumerate(runs)
                        if any(store.class_result_epochs(name, s["idx"]) for s in store.stages(name))), 0)
    kept = st.session_state.get("classes-run-kept")  # the widget's own state is gone after the evaluations view
    run = a.selectbox("Run", runs, index=runs.index(kept) if kept in runs else with_stages, key="classes_run")
    st.session_state["classes-run-kept"] = run
    stages = store.stages(run)
    if not stages:
        row = store.get_run(run)
        if row["state"] == "failed":
            st.error(f"Run {run} failed before its first stage: {row.get('error') or 'see its log on the Train page'}")
        else:
            st.info(f"Run {run} has not started a stage yet.")
        return None, [], None
    stage = b.selectbox("Stage", range(len(stages)), index=len(stages) - 1,
                        format_func=lambda i: f"{i + 1}: {stages[i]['name']} ({stages[i]['dataset']})")
    epochs = store.class_result_epochs(run, stage)
    if not epochs:
        state = store.get_run(run)["state"]
        st.info("No per-class results for this stage yet: they are stored at the end of every epoch."
                if state in ACTIVE_STATES else
                f"No per-class results for this stage: the run ended ({state}) before the stage's first epoch did.")
        return None, [], None
    epoch = c.selectbox("Epoch", epochs[::-1], format_func=lambda e: f"epoch {e}")
    samples = kept_misclassified(store, run, stage, epoch)
    return store.class_results(run, stage, epoch), samples, model_file(stages[stage])


def model_file(stage: dict[str, Any]) -> Path | None:
    """The stage's best.pt, else its last.pt, whichever is still on disk; the stored one (to say it is gone) when
    neither is."""
    stored = [Path(p) for p in (stage.get("best_path"), stage.get("last_path")) if p]
    return next((p for p in stored if p.is_file()), stored[0] if stored else None)


def kept_misclassified(store: RunStore, run: str, stage: int, epoch: int) -> list[dict[str, Any]]:
    """The misclassified images of ``epoch`` when they are kept (a run keeps its best and its last epoch's), else
    the best epoch's (the model best.pt holds), else the last's."""
    kept = store.misclassified_epochs(run, stage)
    best = store.stages(run)[stage].get("best_epoch")
    shown = epoch if epoch in kept else best if best in kept else None
    return store.misclassified(run, stage, epoch=shown)


def pick_evaluation() -> tuple[dict[str, Any] | None, list[dict[str, Any]], Path | None]:
    evaluations = common.store().evaluations()
    if not evaluations:
        st.info("No evaluations yet: run `python -m train eval CHECKPOINT` to add one.")
        return None, [], None
    ids = [e["id"] for e in evaluations]
    kept = st.session_state.get("classes-evaluation-kept")  # as for the run: kept across the runs view
    index = ids.index(kept) if kept in ids else 0
    chosen = st.selectbox("Evaluation", evaluations, index=index, format_func=lambda e: (
        f"{Path(e['checkpoint']).name} on {e['dataset']} {e['split']}{tested(e['data'])} · "
        f"{datetime.fromtimestamp(e['time']):%Y-%m-%d %H:%M} · {common.checkpoint_label(Path(e['checkpoint']))}"))
    st.session_state["classes-evaluation-kept"] = chosen["id"]
    return {**chosen["data"], "split": chosen["split"]}, chosen["misclassified"], Path(chosen["checkpoint"])


def split_word(result: dict[str, Any]) -> str:
    """What the evaluated images are: validation (a run's, or `eval`'s default), or the split `eval` was given."""
    split = result.get("split", "val")
    return {"val": "validation", "train": "training"}.get(split, split)


def tested(result: dict[str, Any]) -> str:
    """How an evaluation was tested (its resolution, flips), for its label; empty for older ones."""
    parts = ([f"{result['image_size']} px"] if result.get("image_size") else []) + (["flips"] if result.get("flip") else [])
    return f" ({', '.join(parts)})" if parts else ""


def summary(result: dict[str, Any], frame: pd.DataFrame) -> None:
    cols = st.columns(6)
    cols[0].metric("Accuracy", f"{result['accuracy']:.1%}", help=f"Correct images / all {split_word(result)} images.")
    top5 = result.get("top5_acc")
    cols[5].metric("Top-5 accuracy", "n/a" if top5 is None else f"{top5:.1%}",
                   help="Images whose true class is among the model's 5 most likely classes (n/a with 5 "
                   "classes or fewer: every class is then among them).")
    gap = f"{result['balanced_acc'] - result['accuracy']:+.1%}"
    cols[1].metric("Balanced accuracy", f"{result['balanced_acc']:.1%}", delta_color="off",  # no arrow for no gap
                   delta=None if gap in ("+0.0%", "-0.0%") else f"{gap} vs accuracy",
                   help="Mean of the per-class accuracies: every class counts the same, however small.")
    cols[2].metric("Classes", len(frame))
    evaluated = "validation" if split_word(result) == "validation" else "evaluated"  # not "training" beside "train"
    for col, column, split in ((cols[3], "train images", "train"), (cols[4], "val images", evaluated)):
        ratio = charts.imbalance_ratio(frame[column].tolist())
        col.metric(f"Imbalance ({split})", "n/a" if math.isnan(ratio) else f"{ratio:.1f}x",
                   help="Largest class / smallest class.")


def class_table(frame: pd.DataFrame) -> None:
    query = st.text_input("Search classes", placeholder="part of a class name")
    shown = frame[frame["class"].str.contains(query, case=False, regex=False)] if query else frame
    share = {"format": "percent", "min_value": 0, "max_value": 1}
    common.table(shown.sort_values(["accuracy", "class"]), height=320,
                 column_config={
                     "accuracy": st.column_config.ProgressColumn("recall (accuracy)", **share,
                                                                 help="Correct / images of the class."),
                     "precision": st.column_config.ProgressColumn(**share, help="Correct / images predicted as it."),
                     "F1": st.column_config.ProgressColumn(**share, help="Harmonic mean of precision and recall."),
                 })


def confusion_view(result: dict[str, Any]) -> None:
    classes, confusion = result["classes"], result["confusion"]
    pairs = pd.DataFrame(confused_pairs(confusion, classes, top=15))
    st.markdown("**Most-confused pairs**")
    if pairs.empty:
        st.caption("No validation images in this result." if not any(map(any, confusion)) else
                   "No confusion at all: every validation image is classified correctly.")
    else:
        common.table(pairs, column_config={"rate": st.column_config.NumberColumn("share of true class",
                                                                              format="percent")})
    n = len(classes)
    left, middle, right = st.columns([3, 1, 1])
    top = left.slider("Classes in the matrix (most confused first)", 2, n, min(n, 20),
                      help="At 101 or 257 classes, the most confused ones as a sub-matrix; drag on the chart to "
                           "zoom, hover a cell for its classes and count.") if n > 2 else n
    normalize = middle.toggle("Row-normalised", value=True, key="confusion_normalised",
                              help="On: each row as shares of the true class. Off: image counts.")
    diagonal = right.toggle("Show correct (diagonal)", help="Off: the colours span the errors only.")
    indices = charts.most_confused_classes(confusion, top) if top < n else None
    st.plotly_chart(charts.confusion_figure(confusion, classes, indices, normalize=normalize, diagonal=diagonal),
                    width="stretch")


def gallery(samples: list[dict[str, Any]], checkpoint: Path | None, epoch: int | None = None,
            split: str = "validation") -> None:
    """The stored misclassified images (a run keeps its best and last epochs'), and Grad-CAM with ``checkpoint``."""
    from core.samples import missing_files

    st.subheader(f"Misclassified {split} images")
    if not samples:
        st.caption("None stored for this choice.")
        return
    kept = samples[0].get("epoch")
    if epoch is not None and kept is not None and kept != epoch:
        st.caption(f"These were misclassified at epoch {kept}; epoch {epoch}'s were not kept (ResLens keeps the "
                   "misclassified images of each stage's best and last epochs; older runs kept the last epoch's only).")
    if checkpoint is not None and not checkpoint.is_file():
        st.caption(f"Grad-CAM needs the model, and {checkpoint} is no longer there (deleted, or moved with its run "
                   "folder).")
    if checkpoint is not None and checkpoint.is_file():
        st.caption(f"Grad-CAM uses {common.checkpoint_label(checkpoint)}.")
        held = common.checkpoint_epoch(checkpoint)
        if kept is not None and held is not None and held != kept:
            st.caption(f"That checkpoint holds epoch {held}, not the epoch-{kept} model that misclassified these "
                       "images: its map shows where it finds the class named, and it may itself classify the image "
                       "otherwise.")
    classes = sorted({s["true"] for s in samples})
    only = st.selectbox("True class", ["all"] + classes)
    chosen = [s for s in samples if only == "all" or s["true"] == only][:GALLERY_SIZE]
    missing = missing_files([s["source"] for s in chosen])
    if missing and len(missing) == len(chosen):
        st.warning(f"These images are no longer at {_folder_of(missing)}: the data set was moved or deleted after "
                   "these results were stored (the figures above still hold).", icon=":material/folder_off:")
        return
    cols = st.columns(4)
    for i, sample in enumerate(chosen):
        with cols[i % 4], common.shown_errors("This image"):
            gallery_item(i, sample, checkpoint)


def _folder_of(files: list[str]) -> str:
    """The folder the files share, or a plain phrase when they share none worth naming."""
    try:
        folder = os.path.commonpath([os.path.dirname(f) for f in files])
    except ValueError:  # absolute and relative paths mixed
        folder = ""
    return folder if folder.strip(os.sep) else "their stored paths"


def gallery_item(i: int, sample: dict[str, Any], checkpoint: Path | None) -> None:
    caption = f"{sample['true']} → {sample['predicted']} ({sample['confidence']:.0%})"
    image_png = cam.source_png(sample["source"])
    if checkpoint is not None and checkpoint.is_file() and st.toggle("Grad-CAM", key=f"cam-{i}-{sample['source']}"):
        st.image(cam.quick_overlay(checkpoint, image_png, sample["predicted"]), caption=caption + " · Grad-CAM of the "
                 "predicted class", width="stretch")
    else:
        st.image(image_png, caption=caption, width="stretch")


def body() -> None:
    st.title("Classes")
    source = st.segmented_control("Results of", ["a training run", "an evaluation"], default="a training run")
    result, samples, checkpoint = pick_evaluation() if source == "an evaluation" else pick_run_result()
    if result is None:
        return
    if result.get("note"):
        st.warning(result["note"], icon=":material/warning:")
    frame = charts.per_class_frame(result)
    summary(result, frame)
    left, right = st.columns(2)
    with left:
        st.markdown("**Per-class accuracy** (worst first)")
        class_table(frame)
    with right:
        st.markdown("**Accuracy against class size**: does the long tail hurt?")
        st.plotly_chart(charts.accuracy_vs_size_figure(frame), width="stretch")
    confusion_view(result)
    gallery(samples, checkpoint, result.get("epoch") if source == "a training run" else None, split_word(result))


common.run_page(body, "The Classes page")
