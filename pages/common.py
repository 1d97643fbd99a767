"""What every page shares: page set-up and navigation, error display, the run store, checkpoint discovery
and cached model loading. A helper module, not a page (the sidebar links only to the real pages; see
NAVIGATION). Logic worth testing lives in core/.
"""
from __future__ import annotations

import logging
import os
import traceback
from datetime import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from core import paths
from core.errors import UserError
from core.run_store import ACTIVE_STATES, RunStore

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("reslens.app")



NAVIGATION = (  # (script, label, icon): Streamlit's own page list is hidden (client.showSidebarNavigation)
    ("app.py", "Home", ":material/home:"),
    ("pages/train.py", "Train", ":material/model_training:"),
    ("pages/monitor.py", "Monitor", ":material/monitoring:"),
    ("pages/classes.py", "Classes", ":material/category:"),
    ("pages/compare.py", "Compare", ":material/compare_arrows:"),
    ("pages/explain.py", "Explain", ":material/visibility:"),
)


def setup(title: str) -> None:
    """Page config and the sidebar's links to the pages; the first call of every page script."""
    st.set_page_config(page_title=f"ResLens · {title}", page_icon="🔎", layout="wide")
    with st.sidebar:
        st.markdown("### :material/search: ResLens")
        for script, label, icon in NAVIGATION:
            st.page_link(script, label=label, icon=icon)
        st.divider()


@contextmanager
def shown_errors(what: str = "This page") -> Iterator[None]:
    """Show a ``UserError`` as its sentence and anything unexpected as one sentence; never a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the page must stay up; the traceback goes to the server log
        log.error("unexpected error\n%s", traceback.format_exc())
        st.error(f"{what} hit an unexpected problem ({type(exc).__name__}: {_first_line(exc)}); "
                 "the details are in the server's log.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no message"


def run_page(body: Callable[[], None], what: str) -> None:
    """Run a page's body inside ``shown_errors``."""
    with shown_errors(what):
        body()


def store() -> RunStore:
    """The run store of the current ResLens home (one connection set per home folder)."""
    return _store(str(paths.store_path()))


@st.cache_resource(show_spinner=False)
def _store(path: str) -> RunStore:
    return RunStore(path)


def badge(state: str) -> str:
    """How a job state reads in tables: plain words (emoji fonts are missing on some machines), failures loud."""
    return "FAILED" if state == "failed" else state


def table(data: Any, **options: Any) -> None:
    """``st.dataframe`` as every page shows it: no index, full width, an empty cell a dash (not the word None)."""
    st.dataframe(data, **{"hide_index": True, "width": "stretch", "placeholder": "–", **options})


def runs_table(runs: list[dict[str, Any]]) -> None:
    """Every run: state, start date, duration, data sets, stage and epoch (from 1), device, best accuracy, error.
    The config of the run chosen below is one click away (its expander)."""
    import pandas as pd

    from core.charts import format_eta

    table(pd.DataFrame([{
        "run": r["name"], "state": badge(r["state"]),
        "started": datetime.fromtimestamp(r["created"]),
        "duration": format_eta(r["updated"] - r["created"]) if r.get("updated") else "",
        "data sets": " → ".join(s.get("dataset", "?") for s in (r.get("config") or {}).get("stages") or []),
        "stage": None if r.get("stage") is None else r["stage"] + 1,
        "epoch": r.get("shown_epoch"),
        "best val accuracy": r.get("best_val_acc"),
        "device": r.get("device") or "",
        "error": first_line(r.get("error") or ""),
    } for r in runs]),
        column_config={"best val accuracy": st.column_config.NumberColumn(format="percent"),
                       "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm")})


def find_checkpoints() -> list[Path]:
    """Every ``*.pt`` under the ResLens home (runs' ``best``/``last`` and exported ones): folders with a
    ``best.pt`` (a validated epoch) first, the newest folder first, and in a folder ``best.pt`` before the others (a
    stage stopped before its first epoch ended has only a half-trained ``last.pt``: not the first choice)."""
    home = paths.reslens_home()
    if not home.is_dir():
        return []
    found = [p for p in home.rglob("*.pt") if p.is_file() and not p.name.startswith(".")]
    newest: dict[Path, float] = {}
    for p in found:
        newest[p.parent] = max(newest.get(p.parent, 0.0), p.stat().st_mtime)
    validated = {p.parent for p in found if p.name == "best.pt"}
    return sorted(found, key=lambda p: (p.parent not in validated, -newest[p.parent], str(p.parent),
                                        p.name != "best.pt", p.name))


def checkpoint_label(path: Path) -> str:
    """'demo-1 / stage2-finetune / best.pt · epoch 6 · 95.0% · 2026-12-01 10:42' for a file under the home
    folder: where it is, then its epoch and validation accuracy (from the run store) and its date."""
    try:
        rel = path.relative_to(paths.runs_dir())
    except ValueError:
        try:
            rel = path.relative_to(paths.reslens_home())
        except ValueError:
            rel = None
    parts = [" / ".join(rel.parts) if rel is not None else str(path)]
    known = _stage_checkpoints(str(paths.store_path())).get(str(path))
    if known and known.get("epoch") is not None:
        parts.append(f"epoch {known['epoch']}")
    if known and known.get("acc") is not None:
        parts.append(f"{known['acc']:.1%}")
    try:
        parts.append(f"{datetime.fromtimestamp(path.stat().st_mtime):%Y-%m-%d %H:%M}")
    except OSError:
        pass
    return " · ".join(parts)


@st.cache_data(ttl=2, show_spinner=False)
def _stage_checkpoints(store_path: str) -> dict[str, dict[str, Any]]:
    """Checkpoint path -> its epoch and accuracy, for every stage in the store at ``store_path`` (best.pt and
    last.pt)."""
    return store().checkpoint_index()


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a stage's best.pt or last.pt holds, from the run store (None for other files)."""
    return (_stage_checkpoints(str(paths.store_path())).get(str(path)) or {}).get("epoch")


def first_line(text: str) -> str:
    return text.strip().partition("\n")[0]


def show_run_error(text: str, prefix: str = "") -> None:
    """A failed run's stored error: its first line in the box, the rest (a multi-line message) verbatim below."""
    st.error(prefix + first_line(text), icon=":material/error:")
    if first_line(text) != text.strip():
        with st.expander("The whole message"):
            st.code(text.strip(), language=None)


def resume_note(run: dict[str, Any], stages: list[dict[str, Any]]) -> str:
    """What Resume does for a run that is not live: where it continues, from the stage's ``last.pt`` on disk."""
    index = run.get("stage") or 0
    last = stages[index].get("last_path") if index < len(stages) else None
    if last and Path(last).is_file():
        return "Resume continues from its last saved checkpoint (the step a Stop saved, or the last completed epoch)."
    return (f"Resume restarts stage {index + 1} from its first epoch: no checkpoint of it was saved (a stage's first "
            "checkpoint is written when its first epoch ends).")


def show_stopped(run: dict[str, Any], stages: list[dict[str, Any]], prefix: str = "", suffix: str = "") -> None:
    """A stopped or interrupted run's box: how it ended and how Resume continues it (nothing for other states)."""
    if run["state"] == "interrupted":
        st.warning(f"{prefix}The trainer ended without saying so (killed, or the machine restarted). "
                   f"{resume_note(run, stages)}{suffix}", icon=":material/pause_circle:")
    elif run["state"] == "stopped":
        st.info(f"{prefix}Stopped on request. {resume_note(run, stages)}{suffix}", icon=":material/pause_circle:")


def is_live(run: dict[str, Any]) -> bool:
    """Whether the run is queued or training (its page parts refresh only then)."""
    return run["state"] in ACTIVE_STATES


def file_version(path: Path) -> tuple[str, int, int]:
    """A cache key that changes whenever the file is rewritten (path, mtime, size)."""
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def folder_version(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the folder or a sub-folder up to two levels down gains or loses an entry
    (class folders lie one level down, or two under train/ and val/)."""
    def folders(parent: Path) -> list[Path]:  # scandir knows an entry's kind without a stat per image file
        with os.scandir(parent) as entries:
            return [Path(e.path) for e in entries if e.is_dir()]

    try:
        levels = [path, *folders(path)]
        levels += [q for p in levels[1:] for q in folders(p)]
        stamps = [p.stat().st_mtime_ns for p in levels]
    except OSError:
        return str(path), -1, 0
    return str(path), max(stamps), len(stamps)


def load_model(path: Path) -> tuple[Any, Any]:
    """(model, CheckpointInfo) of a checkpoint, loaded once per file version and kept in memory."""
    return _load_model(file_version(path))


@st.cache_resource(show_spinner="Loading the model...", max_entries=3)
def _load_model(version: tuple[str, int, int]) -> tuple[Any, Any]:
    from core.checkpoints import load_model as load

    return load(version[0])


def dataset_presence() -> "pd.DataFrame":
    """One row per registered data set under the data root: present or not (a folder check), what it is."""
    import pandas as pd

    from core.datasets import DATASETS, dataset_path

    rows = []
    for name, info in DATASETS.items():
        if info.own_folder:
            rows.append({"data set": name, "present": True, "where": "your own folder (the stage's root; Train page)",
                         "about": info.description})
            continue
        folder = dataset_path(name, paths.data_root())
        rows.append({"data set": name, "present": folder is None or folder.is_dir(),
                     "where": "built in (generated)" if folder is None else str(folder),
                     "about": info.description})
    return pd.DataFrame(rows)


@st.cache_resource(show_spinner=False)
def device_summary() -> str:
    """'GPU: NVIDIA H100 (1 device)', 'Apple GPU (MPS)' or 'CPU only (N cores)'."""
    import os

    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"GPU: {torch.cuda.get_device_name(0)} ({n} device{'s' if n > 1 else ''})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (MPS)"
    return f"CPU only ({os.cpu_count()} cores), no GPU seen"
