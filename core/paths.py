"""Where ResLens keeps things, and keeping user-given names and paths inside their folders."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def reslens_home() -> Path:
    """The folder holding the run store and every run's files (``RESLENS_HOME``)."""
    return Path(os.environ.get("RESLENS_HOME") or REPO_ROOT / "checkpoints").expanduser().resolve()


def data_root() -> Path:
    """The default folder under which data sets live (``RESLENS_DATA``)."""
    return Path(os.environ.get("RESLENS_DATA") or REPO_ROOT / "data").expanduser().resolve()


def uploads_dir() -> Path:
    """Where image archives uploaded in the app are unpacked (``<data root>/uploads``)."""
    return data_root() / "uploads"


def store_path() -> Path:
    return reslens_home() / "reslens.sqlite"


def runs_dir() -> Path:
    return reslens_home() / "runs"


def safe_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"Run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '..', no slashes)."
        )
    return name


def run_dir(name: str) -> Path:
    """The folder of run ``name`` (validated, always inside ``runs_dir()``)."""
    return resolve_inside(runs_dir(), safe_name(name))


def not_a_folder(path: Path) -> str:
    """Why ``path`` is no folder, as the words after it in a sentence."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def typed_path(text: str, base: str | os.PathLike[str]) -> Path:
    """A path a person typed: ``~`` expanded, a relative one taken under ``base``, resolved. ``ValueError`` (one
    sentence) for a NUL byte or a ``~user`` with no home folder here."""
    if "\x00" in text:
        raise ValueError(f"Path {text!r} contains a NUL byte.")
    try:
        path = Path(text.strip()).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise ValueError(f"Path {text!r} starts with a ~ that names no user's home folder here.") from None
    return (path if path.is_absolute() else Path(base) / path).resolve()


def resolve_inside(base: Path, user_path: str | os.PathLike[str]) -> Path:
    """Resolve ``user_path`` relative to ``base``; refuse anything that lands outside ``base``."""
    base = Path(base).resolve()
    text = os.fspath(user_path)
    if "\x00" in text:
        raise ValueError(f"Path {text!r} contains a NUL byte.")
    if Path(text).is_absolute():
        raise ValueError(f"Path {text!r} is absolute; give a path inside {base}.")
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"Path {text!r} leads outside {base}.")
    return target
