"""Train: choose or build a pipeline (stages as rows), check it before launch, run it as its own process,
and follow every job (state, Stop, Resume, log, error)."""
from __future__ import annotations

import hashlib
import threading
from typing import Any

import pandas as pd
import streamlit as st
import yaml

from core import charts, paths
from core.datasets import DATASETS, dataset_path, download
from pages import common
from train.config import (ARCHS, CHOICES, PIPELINE_DEFAULTS, RETENTION, ConfigError, parse_config, parse_yaml, stage_rows,
                          stages_from_rows)

common.setup("Train")

CONFIG_DIR = paths.REPO_ROOT / "train" / "configs"
EDITED = ["name", "dataset", "epochs", "batch_size", "image_size", "lr", "init", "imbalance", "patience"]
EMPTY = "(empty pipeline)"
UPLOADED = "(the file opened below)"
LIVE_REFRESH_S = 2.0
LABELS = {"name": "stage", "dataset": "data set", "lr": "learning rate"}  # others: the key with spaces
SWITCHES = (("amp", "Mixed precision (amp)", "bf16/fp16 autocast where the device has it."),
            ("channels_last", "channels_last", "NHWC memory layout: faster convolutions on most hardware."),
            ("compile", "torch.compile", "Compiles the model first: slower start, faster steps on GPUs."))


def column_label(key: str) -> str:
    """A stage key as the table's column header shows it."""
    return LABELS.get(key, key.replace("_", " "))


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def read_shipped(name: str) -> dict[str, Any]:
    if name == EMPTY:
        return {"name": "my-pipeline", "arch": "resnet50", "stages": [{"name": "stage1", "dataset": "shapes"}]}
    return parse_yaml((CONFIG_DIR / name).read_text()) or {}


def read_uploaded(data: bytes, filename: str) -> dict[str, Any]:
    """A pipeline YAML the user opened; a ConfigError sentence when it is not one."""
    try:
        raw = parse_yaml(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{filename} is not a readable YAML file.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise ConfigError(f"{filename} is not a pipeline: it needs a 'stages' list.")
    return raw


def stages_frame(raw: dict[str, Any]) -> pd.DataFrame:
    """The config's stages as rows of text cells (what the user types is what is read); numbered from 1."""
    rows = stage_rows([s for s in raw.get("stages") or [] if isinstance(s, dict)])
    columns = list(rows[0]) if rows else list(stage_rows([{}])[0])
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    return frame


def rows_to_config(top: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """The pipeline dict the trainer reads, from the top-level fields and the edited rows."""
    return {**top, "stages": stages_from_rows(frame.to_dict("records"))}


def validate(config: dict[str, Any]) -> ConfigError | None:
    """None when the pipeline is valid (data sets aside: they get a download button), else the error."""
    try:
        parse_config(config, base_dir=CONFIG_DIR, check_data=False)
    except ConfigError as exc:
        return exc
    return None


def choose_source() -> tuple[str, dict[str, Any]]:
    """(a key for the chosen pipeline, its dict): a shipped one, an empty one, or a YAML file opened here."""
    options = shipped_configs() + [EMPTY, UPLOADED]
    default = options.index("demo.yaml") if "demo.yaml" in options else 0
    source = st.selectbox("Start from", options, index=default, key="pipeline_source",
                          help="A shipped pipeline from train/configs/, an empty one, or any pipeline YAML file.")
    if source != UPLOADED:
        return source, read_shipped(source)
    upload = st.file_uploader("Open a pipeline YAML", type=["yaml", "yml"], key="pipeline_file")
    if upload is None:
        st.info("Choose a pipeline YAML file to edit it here.")
        st.stop()
    data = upload.getvalue()
    return f"file-{hashlib.sha256(data).hexdigest()[:12]}", read_uploaded(data, upload.name)


def pipeline_editor() -> tuple[dict[str, Any], ConfigError | None]:
    """The pipeline chooser, switches and stage table; returns (the config dict, the first problem or None)."""
    source, raw = choose_source()
    left, middle, right = st.columns([2, 2, 1])
    top = {k: v for k, v in raw.items() if k != "stages"}
    top["name"] = left.text_input("Run name", value=str(raw.get("name", "run")), key=f"name-{source}",
                                  help="Letters, digits, '.', '_' or '-'; a number is added when taken.")
    arch = raw.get("arch", "resnet50")
    top["arch"] = middle.selectbox("Model", ARCHS, index=ARCHS.index(arch) if arch in ARCHS else 0,
                                   key=f"arch-{source}")
    seed = raw.get("seed", PIPELINE_DEFAULTS["seed"])
    top["seed"] = int(right.number_input("Seed", value=int(seed) if isinstance(seed, int) else 0, step=1,
                                         key=f"seed-{source}"))
    columns = st.columns(len(SWITCHES) + 1)
    for column, (key, label, help_text) in zip(columns, SWITCHES):
        top[key] = column.toggle(label, value=bool(raw.get(key, PIPELINE_DEFAULTS[key])), key=f"{key}-{source}",
                                 help=help_text)
    kept = raw.get("retention", PIPELINE_DEFAULTS["retention"])
    top["retention"] = columns[-1].selectbox(
        "Keep checkpoints of", RETENTION, index=RETENTION.index(kept) if kept in RETENTION else 0,
        key=f"retention-{source}", format_func=lambda r: {"all": "every stage", "final": "the final stage"}[r],
        help="'the final stage': once the run has finished, earlier stages' checkpoints are deleted (their "
             "metrics stay).")
    every = st.toggle("Show every column", key="all_columns",
                      help="The table also holds " + ", ".join(column_label(k) for k in hidden_columns()) + ".")
    if not every:
        st.caption("More settings per stage (optimizer, schedule, augmentation, freeze epochs, root, ...) are in "
                   "hidden columns: **Show every column** reveals them.")
    frame = stages_frame(raw)
    edited = st.data_editor(frame, key=f"stages-{source}", num_rows="dynamic", hide_index=False, width="stretch",
                            column_order=list(frame.columns) if every else EDITED,
                            column_config=column_config(frame))
    try:
        config = rows_to_config(top, edited)
    except ConfigError as exc:
        return {**top, "stages": []}, exc
    return config, validate(config)


def hidden_columns() -> list[str]:
    return [k for k in stage_rows([{}])[0] if k not in EDITED]


def column_config(frame: pd.DataFrame) -> dict[str, Any]:
    """Every column as text (kept as typed, checked by train/config.py), choices as select boxes."""
    inits = ["scratch", "imagenet", "previous"] + [str(p) for p in common.find_checkpoints()]
    inits += [v for v in frame["init"].dropna().unique() if v not in inits]
    config: dict[str, Any] = {k: st.column_config.TextColumn(column_label(k)) for k in frame.columns}
    config["dataset"] = st.column_config.SelectboxColumn(column_label("dataset"), options=list(DATASETS))
    config["init"] = st.column_config.SelectboxColumn(
        "init", options=inits, default="previous",
        help="scratch, ImageNet weights, the previous stage's best checkpoint, or a checkpoint file")
    for key, allowed in CHOICES.items():
        config[key] = st.column_config.SelectboxColumn(column_label(key), options=list(allowed))
    config["lr"] = st.column_config.TextColumn(column_label("lr"), help="e.g. 0.1 or 5e-4")
    config["patience"] = st.column_config.TextColumn(
        "patience", help="Early stopping: end the stage after this many epochs without a better validation "
                         "balanced accuracy (0: off).")
    return config


def show_problems(config: dict[str, Any], error: ConfigError | None) -> bool:
    """Show the first config error with its row and column, and any missing data set; True if none."""
    if error is not None:
        where = ""
        if error.stage is not None:
            where = f"Row {error.stage + 1}" + (f", column **{column_label(error.field)}**" if error.field else "")
            where += ": "
        st.error(f"{where}{error}", icon=":material/error:")
    missing = missing_datasets(config)
    for name in missing:
        download_box(name)
    return error is None and not missing


def save_button(config: dict[str, Any]) -> None:
    st.download_button("Save as YAML", yaml.safe_dump(config, sort_keys=False), f"{config.get('name') or 'pipeline'}.yaml",
                       mime="application/x-yaml", icon=":material/save:",
                       help="The edited pipeline as a file for `python -m train run FILE` or to open here later.")


def missing_datasets(config: dict[str, Any]) -> list[str]:
    names = dict.fromkeys(s.get("dataset") for s in config.get("stages", []) if s.get("dataset") in DATASETS)
    return [n for n in names if (folder := dataset_path(n, paths.data_root())) is not None and not folder.is_dir()]


def download_box(name: str) -> None:
    info = DATASETS[name]
    st.warning(f"**{info.title}** is not on this machine (looked for {dataset_path(name, paths.data_root())}).",
               icon=":material/cloud_off:")
    if st.button(f"Download {info.title}", key=f"download-{name}", icon=":material/download:"):
        download_with_progress(name)


def download_with_progress(name: str) -> None:
    """Run core.datasets.download in a worker thread and draw its progress from this script thread."""
    seen: dict[str, Any] = {"done": 0, "total": None, "error": None}

    def work() -> None:
        try:
            download(name, paths.data_root(), progress=lambda d, t: seen.update(done=d, total=t))
        except Exception as exc:  # noqa: BLE001 - shown below as a sentence
            seen["error"] = exc

    bar = st.progress(0.0, text=f"Downloading {name}...")
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        done, total = seen["done"], seen["total"]
        text = f"Downloading {name}: {done / 1e6:.0f} MB" + (f" of {total / 1e6:.0f} MB" if total else "")
        bar.progress(min(1.0, done / total) if total else 0.0, text=text)
    if seen["error"] is not None:
        raise seen["error"]
    bar.progress(1.0, text=f"{name} is ready.")
    st.rerun()


def launch_section(config: dict[str, Any], ready: bool) -> None:
    left, right = st.columns([1, 3])
    device = left.selectbox("Device", ["auto", "cpu", "cuda", "mps"], help="auto: a GPU when one is seen.")
    if right.button("Launch", type="primary", disabled=not ready, icon=":material/rocket_launch:"):
        from train import jobs

        name = jobs.launch(config, device=None if device == "auto" else device)
        st.session_state["selected_run"] = name
        st.session_state["monitor_runs"] = [name]
        st.success(f"Run **{name}** started in its own process; closing this tab does not stop it.")


def job_list() -> None:
    """Every run with its state; the chosen one's controls, error and log. Refreshes while a run is live."""
    runs = common.store().list_runs()
    live = any(common.is_live(r) for r in runs)
    st.fragment(_jobs_body, run_every=LIVE_REFRESH_S if live else None)(live)


def _jobs_body(was_live: bool) -> None:
    """The refreshing part; a fragment reruns on its own, so it shows its own errors."""
    with common.shown_errors("The job list"):
        _jobs(was_live)


def _jobs(was_live: bool) -> None:
    runs = common.store().list_runs()
    if was_live and not any(common.is_live(r) for r in runs):
        st.rerun(scope="app")  # the last live run ended: stop refreshing
    if "deleted" in st.session_state:
        st.success(st.session_state.pop("deleted"), icon=":material/delete:")
    if not runs:
        st.caption("No runs yet: launch one above.")
        return
    common.runs_table(runs)
    names = [r["name"] for r in runs]
    chosen = st.session_state.get("selected_run")
    name = st.selectbox("Run", names, index=names.index(chosen) if chosen in names else 0, key="job_pick")
    job_controls(next(r for r in runs if r["name"] == name))


def job_controls(run: dict[str, Any]) -> None:
    from train import jobs

    name, state = run["name"], run["state"]
    if state == "failed":
        st.error(run.get("error") or "The run failed without saying why; see its log below.")
    elif state == "interrupted":
        st.warning("The trainer stopped without saying so (killed, or the machine restarted). Resume continues "
                   "from the last completed epoch.")
    left, middle, third, right = st.columns([1, 1, 1, 3])
    if left.button("Stop", key=f"stop-{name}", disabled=not common.is_live(run), icon=":material/stop:"):
        jobs.stop(name)
        st.toast(f"Asked {name} to stop; it saves and stops at the next step.")
        st.rerun(scope="app")  # the job list's live refresh follows the new state
    if middle.button("Resume", key=f"resume-{name}", disabled=state not in ("stopped", "interrupted", "failed"),
                     icon=":material/replay:"):
        jobs.resume(name)
        st.toast(f"{name} resumes from its last completed epoch.")
        st.rerun(scope="app")
    delete_control(third, run)
    with st.expander("Config of this run"):
        st.code(run.get("config_yaml") or yaml.safe_dump(run["config"], sort_keys=False), language="yaml")
    st.caption(f"Last lines of {jobs.log_path(name)}")
    st.code(jobs.tail_log(name, 30) or "(no log yet)", language=None)


def lr_find_section(config: dict[str, Any], ready: bool) -> None:
    """The learning-rate range test on one stage of the pipeline above, with its plot and suggestion."""
    with st.expander("Find a learning rate (range test)"):
        st.caption("Trains a throw-away copy of a stage's model for a few steps while the learning rate grows "
                   "from 1e-6 to 1, and suggests the rate where the loss falls fastest "
                   "(also `python -m train lr-find CONFIG --stage N`).")
        stages = config.get("stages") or []
        left, right = st.columns(2)
        index = left.selectbox("Stage", range(len(stages)), key="lr_find_stage",
                               format_func=lambda i: f"{i + 1}: {stages[i].get('name') or ''}")
        steps = right.number_input("Steps", 10, 500, 100, step=10, key="lr_find_steps")
        if st.button("Find a learning rate", disabled=not ready or index is None, icon=":material/search:"):
            from train.lr_find import lr_range_test

            bar = st.progress(0.0, text="Range test...")
            result = lr_range_test(parse_config(config, base_dir=CONFIG_DIR), index, int(steps),
                                   on_step=lambda done, total: bar.progress(done / total, text=f"step {done}"))
            bar.empty()
            st.session_state["lr_find"] = (index, result)
        found = st.session_state.get("lr_find")
        if found is not None:
            stage, result = found
            st.plotly_chart(charts.lr_find_figure(result.lrs, result.losses, result.suggestion), width="stretch")
            if result.suggestion is None:
                st.warning("The loss did not fall over this range: try more steps.")
            else:
                st.success(f"Suggested learning rate for stage {stage + 1}: **{result.suggestion:.2e}** "
                           "(type it into the learning rate column).")


def delete_control(column: Any, run: dict[str, Any]) -> None:
    """A Delete button that asks first (with the space it frees); a live run cannot be deleted."""
    from train import jobs

    name = run["name"]
    with column.popover("Delete", icon=":material/delete:", disabled=common.is_live(run)):
        st.markdown(f"Delete **{name}** for good: its checkpoints, log and metrics "
                    f"({jobs.format_bytes(jobs.disk_usage(name))} on disk)?")
        if st.button("Delete for good", key=f"delete-{name}", type="primary"):
            freed = jobs.delete(name)
            st.session_state["deleted"] = f"Deleted run {name}; freed {jobs.format_bytes(freed)}."
            st.session_state.pop("selected_run", None)
            st.rerun(scope="app")


def body() -> None:
    st.title("Train")
    st.caption("A pipeline trains in stages; each stage starts from the previous stage's best model "
               "(init = previous) with a new head. Edit the rows, then Launch.")
    config, error = pipeline_editor()
    ready = show_problems(config, error)
    if ready:
        st.success(f"The pipeline is valid: {len(config['stages'])} stage(s).", icon=":material/check:")
    with st.expander("The pipeline as YAML"):
        st.code(yaml.safe_dump(config, sort_keys=False), language="yaml")
    save_button(config)
    lr_find_section(config, ready)
    launch_section(config, ready)
    st.header("Jobs")
    job_list()


common.run_page(body, "The Train page")
