"""Train: choose or build a pipeline (stages as rows), point it at your own images (a folder, or a .zip that is
unpacked safely) and read their data report, check it before launch against exactly the folders the trainer
will open, run it as its own process, and follow every job (state, Stop, Resume, log, error)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
import yaml

from core import charts, paths
from core.datasets import DATASETS, dataset_path, download
from core.errors import UserError
from core.image_zip import ArchiveError, describe_skipped, unpack_image_zip
from core.images import MAX_UPLOAD_MB
from core.sizes import iec_bytes
from core.uploads import delete_uploaded, uploaded_sets
from pages import common
from train.config import (ARCHS, CHOICES, ConfigError, NAMED_INITS, PIPELINE_DEFAULTS, PipelineConfig, YamlRefused,
                          check_stage_keys, missing_init, parse_config, parse_settings, parse_yaml, stage_rows,
                          stages_from_rows)
from train import jobs
from train.data_report import class_rows, format_report, outdated, summarize

common.setup("Train")

CONFIG_DIR = paths.REPO_ROOT / "train" / "configs"
EDITED = ["name", "dataset", "root", "epochs", "batch_size", "image_size", "lr", "init", "imbalance", "patience"]
EMPTY = "(empty pipeline)"
IMAGES = "(my images: one stage)"
IMAGE_SOURCES = ("a folder on this machine", "a .zip of class folders")
UPLOADED = "(the file opened below)"
LIVE_REFRESH_S = 2.0
RELAUNCH_AFTER_S = 10.0  # the same pipeline launched again sooner from one tab is a double click, not a new run
LABELS = {"name": "stage", "dataset": "data set", "lr": "learning rate"}  # others: the key with spaces
SWITCHES = (("amp", "Mixed precision (amp)", "bf16/fp16 autocast where the device has it."),
            ("channels_last", "channels_last", "NHWC memory layout: faster convolutions on most hardware."))
COMPILE_CHOICES = {"auto": "auto (on CUDA)", True: "on", False: "off"}
DATA_PATH_LABELS = {"auto": "auto (device on CUDA)", "workers": "DataLoader workers", "device": "the device"}
RETENTION_LABELS = {"all": "every stage", "final": "the final stage"}
# what the page keeps of each pipeline source, as session keys "<prefix>-<source>": its widgets and edits
PER_SOURCE = ("name", "arch", "seed", *(key for key, _, _ in SWITCHES), "compile", "data_path", "retention", "stages",
              "edited-top", "edited-rows", "kept-top", "kept-rows")


def column_label(key: str) -> str:
    """A stage key as the table's column header shows it."""
    return LABELS.get(key, key.replace("_", " "))


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def read_shipped(name: str) -> dict[str, Any]:
    if name == EMPTY:
        return {"name": "my-pipeline", "arch": "resnet50", "stages": [{"name": "stage1", "dataset": "shapes"}]}
    if name == IMAGES:
        return {"name": "my-images", "arch": "resnet50", "stages": [{"name": "images", "dataset": "imagefolder"}]}
    return parse_yaml((CONFIG_DIR / name).read_text(encoding="utf-8")) or {}


def read_uploaded(data: bytes, filename: str) -> dict[str, Any]:
    """A pipeline YAML the user opened; a ConfigError sentence when it is not one."""
    try:
        raw = parse_yaml(data.decode("utf-8"))
    except YamlRefused as exc:
        raise ConfigError(f"{filename} was refused: {exc}.") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{filename} is not a readable YAML file.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise ConfigError(f"{filename} is not a pipeline: it needs a 'stages' list.")
    try:
        # its stages and run name are edited here (a name that cannot be a run's is said there); the other
        # top-level settings must already be valid
        parse_settings({k: v for k, v in raw.items() if k != "name"})
        check_stage_keys(raw["stages"])
    except ConfigError as exc:
        raise ConfigError(f"{filename}: {exc}") from None
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


def choose_source() -> tuple[str, dict[str, Any]] | None:
    """(a key for the chosen pipeline, its dict): a shipped one, an empty one, or a YAML file opened here (None
    until that file is chosen)."""
    options = shipped_configs() + [EMPTY, IMAGES, UPLOADED]
    default = options.index("demo.yaml") if "demo.yaml" in options else 0
    source = st.selectbox("Start from", options, index=default, key="pipeline_source",
                          help="A shipped pipeline from train/configs/, an empty one, one stage on your own images, "
                               "or any pipeline YAML file.")
    if source != UPLOADED:
        return shown(source, read_shipped(source))
    upload = st.file_uploader("Open a pipeline YAML", type=["yaml", "yml"], key="pipeline_file")
    if upload is None:
        st.info("Choose a pipeline YAML file to edit it here.")
        return None
    data = upload.getvalue()
    return shown(f"file-{hashlib.sha256(data).hexdigest()[:12]}", read_uploaded(data, upload.name))


def shown(source: str, raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(source, its pipeline as last edited here): Streamlit forgets the widgets a run does not draw, so when they
    are drawn afresh (after another pipeline or page was shown), the settings and rows as last edited become their
    defaults."""
    state = st.session_state
    if f"name-{source}" not in state and f"edited-top-{source}" in state:
        state[f"kept-top-{source}"] = state[f"edited-top-{source}"]
        state[f"kept-rows-{source}"] = state[f"edited-rows-{source}"]
    return source, {**raw, **state.get(f"kept-top-{source}", {})}


def pipeline_editor() -> tuple[dict[str, Any], ConfigError | None] | None:
    """The pipeline chooser, switches and stage table; returns (the config dict, a row the table cannot read), or
    None while there is no pipeline to edit."""
    chosen = choose_source()
    if chosen is None:
        return None
    source, raw = chosen
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
    top.update(speed_settings(raw, source))
    every = st.toggle("Show every column", key="all_columns", on_change=keep_edited_rows, args=(source,),
                      help="The table also holds " + ", ".join(column_label(k) for k in hidden_columns()) + ".")
    if not every:
        st.caption("More settings per stage (optimizer, schedule, augmentation, freeze epochs, options, ...) are in "
                   "hidden columns: **Show every column** reveals them.")
    frame = st.session_state.get(f"kept-rows-{source}")
    frame = stages_frame(raw) if frame is None else frame
    edited = st.data_editor(frame, key=f"stages-{source}", num_rows="dynamic", hide_index=False, width="stretch",
                            column_order=list(frame.columns) if every else EDITED,
                            column_config=column_config(frame))
    st.session_state[f"edited-rows-{source}"] = edited
    st.session_state[f"edited-top-{source}"] = top
    st.button("Undo my edits", key="undo-edits", on_click=forget_edits, args=(source,),
              help="Back to this pipeline's own settings and stages, as its file has them.")
    try:
        config = rows_to_config(top, edited)
    except ConfigError as exc:
        return {**top, "stages": []}, exc
    return config, None


def keep_edited_rows(source: str) -> None:
    """Before the table shows other columns: Streamlit takes it for a new table and drops its edits, so the rows
    as edited become the table's data."""
    edited = st.session_state.get(f"edited-rows-{source}")
    if edited is not None:
        st.session_state[f"kept-rows-{source}"] = edited


def forget_edits(source: str) -> None:
    """Every widget and kept value of ``source``'s pipeline, so that it is drawn afresh from its file."""
    for prefix in PER_SOURCE:
        st.session_state.pop(f"{prefix}-{source}", None)


def speed_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The pipeline's top-level switches: amp, channels_last, torch.compile, the data path, retention."""
    columns = st.columns(len(SWITCHES) + 3)
    chosen: dict[str, Any] = {}
    for column, (key, label, help_text) in zip(columns, SWITCHES):
        chosen[key] = column.toggle(label, value=bool(raw.get(key, PIPELINE_DEFAULTS[key])), key=f"{key}-{source}",
                                    help=help_text)
    chosen["compile"] = setting_choice(
        columns[-3], raw, source, "compile", "torch.compile", COMPILE_CHOICES,
        "Compiles the model at a stage's first step: a slower start (the Monitor says so), faster steps on GPUs. "
        "auto: on when training on CUDA, off on CPUs (where it does not pay).")
    chosen["data_path"] = setting_choice(
        columns[-2], raw, source, "data_path", "Augment on", DATA_PATH_LABELS,
        "Where training batches are cropped, flipped and jittered: per image in DataLoader workers, or a whole "
        "batch at once on the device (what feeds a GPU fast enough). auto: the device on CUDA.")
    chosen["retention"] = setting_choice(
        columns[-1], raw, source, "retention", "Keep checkpoints of", RETENTION_LABELS,
        "'the final stage': once the run has finished, earlier stages' checkpoints are deleted (their metrics stay).")
    return chosen


def setting_choice(column: Any, raw: dict[str, Any], source: str, key: str, label: str, labels: dict[Any, str],
                   help_text: str) -> Any:
    """A select box for one top-level setting: its value in ``raw`` (else the default) preselected."""
    choices = list(labels)
    value = raw.get(key, PIPELINE_DEFAULTS[key])
    return column.selectbox(label, choices, index=choices.index(value) if value in labels else 0,
                            key=f"{key}-{source}", format_func=labels.__getitem__, help=help_text)


def hidden_columns() -> list[str]:
    return [k for k in stage_rows([{}])[0] if k not in EDITED]


def column_config(frame: pd.DataFrame) -> dict[str, Any]:
    """Every column as text (kept as typed, checked by train/config.py), choices as select boxes."""
    inits = list(NAMED_INITS) + [str(p) for p in common.find_checkpoints()]
    inits += [v for v in frame["init"].dropna().unique() if v not in inits]
    config: dict[str, Any] = {k: st.column_config.TextColumn(column_label(k)) for k in frame.columns}
    config["dataset"] = st.column_config.SelectboxColumn(column_label("dataset"), options=list(DATASETS))
    config["init"] = st.column_config.SelectboxColumn(
        "init", options=inits, default="previous",
        help="scratch, ImageNet weights, the previous stage's best checkpoint, or a checkpoint file")
    for key, allowed in CHOICES.items():
        config[key] = st.column_config.SelectboxColumn(column_label(key), options=list(allowed))
    config["lr"] = st.column_config.TextColumn(column_label("lr"), help="e.g. 0.1 or 5e-4")
    config["root"] = st.column_config.TextColumn(
        "root", help="Where the data set is read from: empty = the data root; for imagefolder the image folder "
                     "itself (empty = the folder chosen under Your own images). An absolute path, or one under the "
                     "data root.")
    config["patience"] = st.column_config.TextColumn(
        "patience", help="Early stopping: end the stage after this many epochs without a better value of the "
                         "'select' metric (0: off).")
    config["select"] = st.column_config.SelectboxColumn(
        "select", options=list(CHOICES["select"]),
        help="The validation metric that picks best.pt and drives patience: accuracy, or balanced accuracy "
             "(the mean of the per-class accuracies).")
    config["train_size_start"] = st.column_config.TextColumn(
        column_label("train_size_start"), help="Resolution schedule (augment strong): the first epoch trains at this "
        "size, growing to image size over the first 'train size ramp' of the epochs (0: off).")
    return config


def absolute_path(text: str) -> Path:
    """A folder or checkpoint path the user typed: ``~`` expanded; a relative path is taken under the data root
    (``ValueError``, one sentence, for a path that cannot be one)."""
    return paths.typed_path(text, paths.data_root())


def with_roots(config: dict[str, Any], images: Path | None) -> dict[str, Any]:
    """The config with every stage's root and init as the trainer will read them: typed ones made absolute, empty
    imagefolder roots set to the chosen image folder (so the check, the YAML and the launch all agree)."""
    stages = []
    for stage in config.get("stages", []):
        stage = dict(stage)
        if isinstance(stage.get("root"), str) and stage["root"].strip():
            with contextlib.suppress(ValueError):  # kept as typed: the check below says why it cannot be read
                stage["root"] = str(absolute_path(stage["root"]))
        elif stage.get("dataset") == "imagefolder" and images is not None:
            stage["root"] = str(images)
        init = stage.get("init")
        if isinstance(init, str) and init.strip() and init not in NAMED_INITS:
            with contextlib.suppress(ValueError):  # as for roots; an init path is taken under the data root too
                stage["init"] = str(absolute_path(init))
        stages.append(stage)
    return {**config, "stages": stages}


def show_problems(config: dict[str, Any], error: ConfigError | None, images: Path | None = None,
                  images_refused: bool = False) -> bool:
    """Show the first config problem at its row and column, any data missing where a stage will read it (data sets
    get a download button), and the data report of every image folder a stage uses (``images`` has its own above);
    True if all is well."""
    pipeline = validated(config, error, images_refused)
    if pipeline is None:
        return False
    for i, stage in enumerate(pipeline.stages):
        if stage.init not in NAMED_INITS and (problem := missing_init(stage.init)):
            st.error(f"{cell_ref(i, 'init')}checkpoint {problem}.", icon=":material/error:")
            return False
    missing = missing_data(pipeline)
    for name, root, folder in missing:
        if folder != images:  # a chosen image folder that is missing already says so above
            missing_box(name, root, folder)
    reports_ok = True
    for root, options in image_folders(pipeline):
        if Path(root) == images and not options:  # the chosen folder's report is shown above
            report, error = cached_report(Path(root), options)
        else:
            with st.expander(f"Data report of {root}" + (f" with {options}" if options else ""), expanded=True):
                report, error = show_folder_report(Path(root), options)
        reports_ok &= error is None and readable(root, options, report)
    return not missing and reports_ok


def readable(root: str, options: dict[str, Any], report: dict[str, Any]) -> bool:
    """False, with the reason shown, when the stage would stop at an image its data report found unreadable."""
    unreadable = report["splits"]["all"]["unreadable"]
    if not unreadable or options.get("skip_unreadable"):
        return True
    st.error(f"{len(unreadable)} image(s) under {root} cannot be read, so the run would stop at the first: "
             f"{unreadable[0]} Remove them, or give the stage options {{skip_unreadable: true}} (Show every column) "
             "to leave them out.", icon=":material/broken_image:")
    return False


def validated(config: dict[str, Any], error: ConfigError | None, images_refused: bool) -> PipelineConfig | None:
    """The pipeline, or None with its first problem shown (the table's ``error``, else validation's). With
    ``images_refused`` (the image section above refused its folder or zip), a stage left without a root is not
    reported a second time."""
    try:
        if error is not None:
            raise error
        return parse_config(config, base_dir=CONFIG_DIR, check_data=False)
    except ConfigError as exc:
        waiting = exc.field == "root" and exc.stage is not None and not config["stages"][exc.stage].get("root")
        if waiting and not images_chosen():  # nothing to complain of yet: the user has not chosen the images
            st.info(f"Stage {exc.stage + 1} trains on your own images: type their folder or drop a .zip of class "
                    "folders under **Your own images** above.", icon=":material/photo_library:")
        elif not (images_refused and waiting):
            st.error(f"{cell_ref(exc.stage, exc.field)}{exc}", icon=":material/error:")
        return None


def cell_ref(stage: int | None, field: str | None) -> str:
    """'Row 2, column **root**: ' for a problem in a stage's cell; '' outside the stages."""
    if stage is None:
        return ""
    return f"Row {stage + 1}" + (f", column **{column_label(field)}**" if field else "") + ": "


def save_button(config: dict[str, Any]) -> None:
    st.download_button("Save as YAML", yaml.safe_dump(config, sort_keys=False), f"{config.get('name') or 'pipeline'}.yaml",
                       mime="application/x-yaml", icon=":material/save:",
                       help="The edited pipeline as a file for `python -m train run FILE` or to open here later.")


def missing_data(pipeline: PipelineConfig) -> list[tuple[str, str, Path]]:
    """(data set, root, folder) of every stage whose data is not where the trainer will look for it."""
    found: dict[Path, tuple[str, str, Path]] = {}
    for stage in pipeline.stages:
        folder = dataset_path(stage.dataset, stage.root)
        if folder is not None and not folder.is_dir():
            found.setdefault(folder, (stage.dataset, str(stage.root), folder))
    return list(found.values())


def image_folders(pipeline: PipelineConfig) -> list[tuple[str, dict[str, Any]]]:
    """The distinct (root, options) of the pipeline's imagefolder stages whose folder exists."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for stage in pipeline.stages:
        if stage.dataset == "imagefolder" and Path(str(stage.root)).is_dir():
            key = f"{stage.root}|{json.dumps(stage.options, sort_keys=True)}"
            found.setdefault(key, (str(stage.root), stage.options))
    return list(found.values())


def missing_box(name: str, root: str, folder: Path) -> None:
    info = DATASETS[name]
    if info.own_folder:
        st.error(f"{folder} {paths.not_a_folder(folder)}: set the stage's root to your image folder.",
                 icon=":material/folder_off:")
        return
    st.warning(f"**{info.title}** is not on this machine (looked for {folder}).", icon=":material/cloud_off:")
    if st.button(f"Download {info.title}", key=f"download-{name}-{root}", icon=":material/download:"):
        download_with_progress(name, root)


def download_with_progress(name: str, root: str) -> None:
    """Run core.datasets.download in a worker thread and draw its progress from this script thread."""
    seen: dict[str, Any] = {"done": 0, "total": None, "error": None}

    def work() -> None:
        try:
            download(name, root, progress=lambda d, t: seen.update(done=d, total=t))
        except Exception as exc:  # noqa: BLE001 - shown below as a sentence
            seen["error"] = exc

    bar = st.progress(0.0, text=f"Downloading {name}...")
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        done, total = seen["done"], seen["total"]
        text = f"Downloading {name}: {iec_bytes(done)}" + (f" of {iec_bytes(total)}" if total else "")
        bar.progress(min(1.0, done / total) if total else 0.0, text=text)
    if seen["error"] is not None:
        raise seen["error"]
    bar.progress(1.0, text=f"{name} is ready.")
    st.rerun()


def images_section(config: dict[str, Any]) -> Path | None:
    """Your own images: a folder or an uploaded .zip; returns the folder after showing its data report. Open
    when a stage reads an image folder or one is chosen."""
    wanted = any(s.get("dataset") == "imagefolder" for s in config.get("stages", []))
    with st.expander("Your own images: a folder, or a .zip of class folders", expanded=wanted or images_chosen(),
                     icon=":material/photo_library:"):
        return _images_body()


def images_chosen() -> bool:
    """Whether a folder is typed or a zip dropped in the image section."""
    return bool(st.session_state.get("images_folder") or st.session_state.get("images_zip"))


def _images_body() -> Path | None:
    st.caption("One folder of images per class (or train/ and val/ folders of class folders); the class names are "
               "the folder names. Stages whose data set is **imagefolder** and whose root is empty use this folder; "
               f"**{IMAGES}** under Start from is a pipeline with one such stage.")
    source = st.segmented_control("Images from", IMAGE_SOURCES, default=IMAGE_SOURCES[0], key="images_from")
    folder = uploaded_folder() if source == IMAGE_SOURCES[1] else typed_folder()
    if folder is not None:
        show_folder_report(folder, {})
    if source == IMAGE_SOURCES[1]:
        unpacked_uploads()
    return folder


def typed_folder() -> Path | None:
    text = st.text_input("Image folder", key="images_folder", placeholder="/path/to/my-images",
                         help=f"An absolute path, or a path under the data root ({paths.data_root()}).")
    if not text.strip():
        return None
    try:
        return absolute_path(text)
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
        return None


def uploaded_folder() -> Path | None:
    """The folder an uploaded .zip was unpacked into (once per upload), or None with the refusal shown."""
    upload = st.file_uploader("A .zip of class folders", type=["zip"], key="images_zip",
                              help=f"Unpacked under {paths.uploads_dir()}; only image files are kept. Up to "
                                   f"{MAX_UPLOAD_MB} MiB: point at a folder for larger sets.")
    if upload is None:
        return None
    unpacked = st.session_state.setdefault("unpacked_zips", {})
    if upload.file_id not in unpacked:
        with st.spinner(f"Unpacking {upload.name}..."):
            try:
                found = unpack_image_zip(upload, upload.name)
                unpacked[upload.file_id] = {"folder": str(found.folder), "images": found.images,
                                            "skipped": found.skipped}
            except ArchiveError as exc:
                unpacked[upload.file_id] = {"error": str(exc)}
    entry = unpacked[upload.file_id]
    if "error" in entry:
        st.error(entry["error"], icon=":material/block:")
        return None
    if not Path(entry["folder"]).is_dir():
        st.info(f"The folder {upload.name} was unpacked into is deleted: remove the file above and drop it again to "
                "unpack it anew.", icon=":material/folder_off:")
        return None
    st.success(f"Unpacked {entry['images']} images from {upload.name} into {entry['folder']}.")
    if entry["skipped"]:
        st.warning(describe_skipped(entry["skipped"]))
    return Path(entry["folder"])


def unpacked_uploads() -> None:
    """The zips unpacked so far (size, runs trained on them); delete those no longer needed."""
    for said in st.session_state.pop("uploads_deleted", []):  # the last deletion's outcome, after its rerun
        if said.startswith("Deleted "):
            st.success(said, icon=":material/delete:")
        else:
            st.error(said, icon=":material/block:")
    sets = uploaded_sets(common.store())
    if not sets:
        return
    st.markdown(f"**Unpacked uploads**: {len(sets)} in {paths.uploads_dir()}, "
                f"{iec_bytes(sum(s.bytes for s in sets))} in all.")
    common.table(pd.DataFrame([{"folder": s.target.name, "images": s.images, "size": iec_bytes(s.bytes),
                                "unpacked": f"{datetime.fromtimestamp(s.unpacked):%Y-%m-%d %H:%M}",
                                "runs trained on it": ", ".join(s.runs) or "-"} for s in sets]))
    by_name = {s.target.name: s for s in sets}
    chosen = st.multiselect("Delete unpacked uploads", list(by_name), key="uploads_to_delete",
                            placeholder="folders to delete",
                            help="Deletes the images unpacked from a zip. Runs trained on them keep their results; "
                                 "their misclassified images and `eval` need the images again.")
    if chosen and st.button(f"Delete {len(chosen)} folder{'s' if len(chosen) > 1 else ''}",
                            icon=":material/delete:", key="delete_uploads"):
        deleted, refused = [], []
        for name in chosen:
            try:
                delete_uploaded(by_name[name], common.store())
                deleted.append(name)
            except UserError as exc:
                refused.append(str(exc))
        freed = sum(by_name[name].bytes for name in deleted)
        st.session_state["uploads_deleted"] = (
            [f"Deleted {', '.join(deleted)}; freed {iec_bytes(freed)}."] if deleted else []) + refused
        st.session_state.pop("uploads_to_delete", None)
        st.rerun()


def show_folder_report(folder: Path, options: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The data report of an image folder (as `python -m train data imagefolder` prints it); returns what it drew,
    ``cached_report``'s (report, error)."""
    report, error = cached_report(folder, options)
    if error is not None:
        st.error(error, icon=":material/error:")
        return report, error
    all_images = report["splits"]["all"]
    ratio = all_images["imbalance_ratio"]
    st.markdown(f"**Data report**: {report['classes']} classes, {all_images['images']} images, imbalance "
                f"{'n/a' if ratio is None else f'{ratio:.1f}x'} (largest class / smallest).")
    st.code(format_report(report), language=None)
    common.table(pd.DataFrame(class_rows(report)), height=240)
    return report, error


def cached_report(folder: Path, options: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``folder_report`` of the folder as it is now (its version keys the cache; a file found unreadable and fixed
    in place since clears it)."""
    args = (str(folder), json.dumps(options, sort_keys=True), common.folder_version(folder))
    report, error = folder_report(*args)
    if report is not None and outdated(report):
        folder_report.clear(*args)  # this folder's entry only
        report, error = folder_report(*args)
    return report, error


@st.cache_data(show_spinner="Reading the image folder...", max_entries=16)
def folder_report(root: str, options: str, version: tuple[str, int, int]) -> tuple[dict[str, Any] | None, str | None]:
    """(report, None) or (None, the sentence saying why the folder cannot be used); ``version`` keys the cache."""
    try:
        return summarize("imagefolder", root, json.loads(options)), None
    except UserError as exc:
        return None, str(exc)


def launch_section(config: dict[str, Any], ready: bool) -> None:
    left, right = st.columns([1, 3])
    device = left.selectbox("Device", ["auto", "cpu", "cuda", "mps"], help="auto: a GPU when one is seen.")
    if not right.button("Launch", type="primary", disabled=not ready, icon=":material/rocket_launch:"):
        return
    launched = f"{digest(config)}-{device}"
    earlier = st.session_state.get("last_launch")
    if earlier is not None and earlier[0] == launched and time.monotonic() - earlier[1] < RELAUNCH_AFTER_S:
        st.info(f"Run **{earlier[2] or 'of this pipeline'}** was launched from this page a moment ago; this click "
                f"did not start a second one. Click again after {RELAUNCH_AFTER_S:.0f} s to start another run of "
                "the same pipeline.", icon=":material/block:")
        return
    st.session_state["last_launch"] = (launched, time.monotonic(), None)  # before launching: a second click waits
    try:
        with st.spinner("Checking the stages' starting weights (ImageNet ones are downloaded when missing)..."):
            name = jobs.launch(config, device=None if device == "auto" else device)
    except BaseException:
        st.session_state.pop("last_launch", None)  # nothing started: a retry is not a double click
        raise
    st.session_state["last_launch"] = (launched, time.monotonic(), name)
    st.session_state["job_pick"] = name  # the job list is drawn after this: it shows the new run's controls
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
    if st.session_state.get("job_pick") not in names:  # deleted meanwhile: the newest run
        st.session_state.pop("job_pick", None)
    name = st.selectbox("Run", names, key="job_pick")
    job_controls(next(r for r in runs if r["name"] == name))


def job_controls(run: dict[str, Any]) -> None:
    name, state = run["name"], run["state"]
    if state == "failed":
        common.show_run_error(run.get("error") or "The run failed without saying why; see its log below.")
    else:
        common.show_stopped(run, common.store().stages(name))
    left, middle, third, right = st.columns([1, 1, 1, 3])
    if left.button("Stop", key=f"stop-{name}", disabled=not common.is_live(run), icon=":material/stop:"):
        jobs.stop(name)
        st.toast(f"Asked {name} to stop; it saves and stops at the next step.")
        st.rerun(scope="app")  # the job list's live refresh follows the new state
    if middle.button("Resume", key=f"resume-{name}", disabled=state not in ("stopped", "interrupted", "failed"),
                     icon=":material/replay:"):
        with st.spinner(f"Resuming {name} (once its last trainer has let go of it)..."):
            jobs.resume(name)
        st.toast(f"{name} resumes.")
        st.rerun(scope="app")
    delete_control(third, run)
    with st.expander("Config of this run"):
        st.code(run.get("config_yaml") or yaml.safe_dump(run["config"], sort_keys=False), language="yaml")
    st.caption(f"Last lines of {jobs.log_path(name)}")
    st.code(jobs.tail_log(name, 30) or "(no log file yet: a run launched here writes one; a run started with "
            "`python -m train run` prints to its terminal instead)", language=None)


def digest(config: dict[str, Any], index: int | None = None) -> str:
    """A short fingerprint of the pipeline (or of its stage ``index`` with the pipeline's settings)."""
    part = config if index is None else {**config, "stages": (config.get("stages") or [])[index:index + 1]}
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            st.session_state["lr_find"] = (index, digest(config, index), result)
        found = st.session_state.get("lr_find")
        if found is not None and found[1] == digest(config, found[0]):  # a result of the pipeline shown, not another
            stage, _, result = found
            st.plotly_chart(charts.lr_find_figure(result.lrs, result.losses, result.suggestion), width="stretch")
            if result.suggestion is None:
                st.warning("The loss did not fall over this range: try more steps.")
            else:
                st.success(f"Suggested learning rate for stage {stage + 1}: **{result.suggestion:.2e}** "
                           "(type it into the learning rate column).")
            if result.caveat:
                st.caption(f"Note: {result.caveat[0].upper()}{result.caveat[1:]} "
                           "(`python -m train lr-find CONFIG --stage N --init BEST_PT`).")


def delete_control(column: Any, run: dict[str, Any]) -> None:
    """A Delete button that asks first (with the space it frees); a live run cannot be deleted."""
    name = run["name"]
    alive = jobs.has_live_trainer(run)
    with column.popover("Delete", icon=":material/delete:", disabled=common.is_live(run) or alive,
                        help="A run whose trainer is still alive (even paused) cannot be deleted: stop it first."
                        if alive else None):
        st.markdown(f"Delete **{name}** for good: its checkpoints, log and metrics "
                    f"({iec_bytes(jobs.disk_usage(name))} on disk)?")
        if st.button("Delete for good", key=f"delete-{name}", type="primary"):
            with st.spinner(f"Deleting {name} (once its last trainer has let go of it)..."):
                freed = jobs.delete(name)
            st.session_state["deleted"] = f"Deleted run {name}; freed {iec_bytes(freed)}."
            st.rerun(scope="app")


def cache_section() -> None:
    """The image cache on disk (each split decoded once, per size): what it holds, and a button that clears it."""
    from train.image_cache import cache_entries, remove_cache, swept_sentence, sweep_stale_builds

    swept = sweep_stale_builds()  # partial files of builds whose process died
    entries = cache_entries()
    total = sum(e.size for e in entries)
    with st.expander(f"Image cache on disk: {len(entries)} cached splits, {iec_bytes(total)}"):
        if swept:
            st.info(swept_sentence(swept))
        if "cache_cleared" in st.session_state:
            st.success(st.session_state.pop("cache_cleared"), icon=":material/delete:")
        if not entries:
            st.caption("Empty: a run decodes each split it uses once, at its size, and keeps it here.")
            return
        common.table(pd.DataFrame({"last used": [datetime.fromtimestamp(e.last_used) for e in entries],
                                   "size": [iec_bytes(e.size) for e in entries], "holds": [e.what for e in entries]}))
        with st.popover("Clear the image cache", icon=":material/delete:"):
            st.markdown(f"Delete all {len(entries)} cached splits ({iec_bytes(total)})? Runs training now keep "
                        "theirs and finish; later runs decode their images again.")
            if st.button("Clear for good", key="clear-cache", type="primary"):
                freed = sum(remove_cache(e) for e in entries)
                st.session_state["cache_cleared"] = f"Cleared the image cache; freed {iec_bytes(freed)}."
                st.rerun(scope="app")


def body() -> None:
    st.title("Train")
    st.caption("A pipeline trains in stages; each stage starts from the previous stage's best model "
               "(init = previous) with a new head. Edit the rows, then Launch.")
    edited = pipeline_editor()
    if edited is not None:  # the Jobs below are there whatever is (or is not yet) chosen above
        pipeline_sections(*edited)
    st.header("Jobs")
    job_list()
    cache_section()


def pipeline_sections(config: dict[str, Any], error: ConfigError | None) -> None:
    """Everything about the pipeline being edited: its images, problems, YAML, learning-rate test and Launch."""
    images = images_section(config)
    config = with_roots(config, images)
    ready = show_problems(config, error, images, images_refused=images is None and images_chosen())
    if ready:
        st.success(f"The pipeline is valid: {len(config['stages'])} stage(s).", icon=":material/check:")
    with st.expander("The pipeline as YAML"):
        st.code(yaml.safe_dump(config, sort_keys=False), language="yaml")
    save_button(config)
    lr_find_section(config, ready)
    launch_section(config, ready)


common.run_page(body, "The Train page")
