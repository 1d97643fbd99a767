"""Trainer processes for the app: launch, stop and resume detached jobs, and read their logs.

A job is ``python -m train run|resume ...`` started in its own session (``start_new_session``),
with stdout/stderr appended to ``<run dir>/log.txt``: closing the browser or restarting the app
never touches it. The run-store row is written (state ``queued``) before the process starts, so
the app sees the run at once; the trainer takes the row over when it starts.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from core import paths
from core.errors import UserError
from core.run_store import ACTIVE_STATES, RunStore, RunStoreError, pid_alive
from core.sizes import folder_bytes
from train.config import (ConfigError, PipelineConfig, apply_overrides, load_config, parse_config,
                          stage_label)
from train.trainer_lock import trainer_lock_held

LOG_NAME = "log.txt"
CONFIG_NAME = "config.yaml"
TRAINER_EXIT_S = 30.0  # how long resume and delete wait for a trainer that stored its ending to free the run


def log_path(name: str) -> Path:
    return paths.run_dir(name) / LOG_NAME


def _candidates(base: str) -> Iterable[str]:
    """``base``, ``base-2``, ``base-3``, ... (run names to try in turn)."""
    paths.safe_name(base)
    yield base
    n = 1
    while True:
        n += 1
        yield f"{base[:60]}-{n}"


def prepare_run(
    config: PipelineConfig, store: RunStore, run_name: str | None = None, state: str = "queued",
    pid: int | None = None,
) -> str:
    """Claim the run name in the store (for trainer process ``pid`` when known), then write
    ``<run dir>/config.yaml``; return the name.

    An explicit ``run_name`` that is taken (in the store or on disk) raises ``RunStoreError``; without
    one, the config's name gets a numeric suffix when needed. The store row is claimed first, so two
    launches at once (a double click) get two names and never share a run folder.
    """
    if run_name is not None:
        try:
            paths.safe_name(run_name)
        except ValueError as exc:
            raise RunStoreError(str(exc)) from None
        if paths.run_dir(run_name).exists() and not store.has_run(run_name):
            raise RunStoreError(f"A folder for run {run_name!r} already exists in {paths.runs_dir()}; "
                                "choose another name.")
    text = config.to_yaml()
    for name in [run_name] if run_name is not None else _candidates(config.name):
        if run_name is None and paths.run_dir(name).exists():
            continue  # a folder left by a deleted run: never mix its files with a new run's
        try:
            store.create_run(name, config.to_dict(), config_yaml=text, config_path=config.source, state=state,
                             pid=pid)
        except RunStoreError:
            if run_name is not None:
                raise
            continue
        folder = paths.run_dir(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        except OSError as exc:  # the row goes too: no run is left that never had a folder
            store.delete_run(name)
            raise RunStoreError(f"Cannot create the folder of run {name!r} ({exc.filename or folder}: "
                                f"{exc.strerror or exc}); nothing was started.") from None
        return name
    raise AssertionError("unreachable")  # _candidates never ends


def check_inits(config: PipelineConfig) -> None:
    """Raise ``ConfigError`` for a stage whose ``init`` cannot be had: a checkpoint that cannot be read or holds
    another architecture, ImageNet weights neither cached nor downloadable. Found before a run is made, not when
    the stage starts, maybe hours into the pipeline."""
    for i in range(len(config.stages)):
        check_init(config, i)


def check_init(config: PipelineConfig, i: int) -> None:
    """``check_inits`` for stage ``i`` alone."""
    from core.checkpoints import check_compatible, checkpoint_info
    from core.models import fetch_imagenet_weights

    stage = config.stages[i]
    if stage.init in ("scratch", "previous"):
        return
    try:
        if stage.init == "imagenet":
            fetch_imagenet_weights(config.arch)
        else:
            check_compatible(checkpoint_info(stage.init), arch=config.arch)
    except UserError as exc:
        text = str(exc)  # "Checkpoint X holds ..." -> "init checkpoint X holds ..."
        if stage.init != "imagenet":
            text = "init " + (f"c{text[1:]}" if text.startswith("Checkpoint ") else text)
        raise ConfigError(f"{stage_label(i, stage)}: {text}", stage=i, field="init") from None


def what_is_missing(config: PipelineConfig) -> list[str]:
    """Every stage's missing data set or starting weights, one sentence each, for a pipeline whose settings were
    checked without its files (``load_config(check_data=False)``): all of them at once, not one per attempt."""
    from train.config import check_stage_files

    missing = []
    for i in range(len(config.stages)):
        try:
            check_stage_files(config, i)
            check_init(config, i)
        except UserError as exc:
            missing.append(str(exc))
    return missing


def launch(
    config: str | os.PathLike[str] | dict[str, Any],
    run_name: str | None = None,
    overrides: Iterable[str] = (),
    device: str | None = None,
) -> str:
    """Validate ``config`` (a YAML path or a dict), queue the run and start a detached trainer.

    Returns the run name. Config problems raise ``ConfigError`` before anything is written.
    """
    if isinstance(config, dict):
        pipeline = parse_config(apply_overrides(config, overrides))
    else:
        pipeline = load_config(config, overrides)
    check_inits(pipeline)
    store = RunStore()
    name = prepare_run(pipeline, store, run_name)
    args = ["run", str(paths.run_dir(name) / CONFIG_NAME), "--run-name", name]
    if device:
        args += ["--device", device]
    _spawn(name, args, store)
    return name


def resume(name: str, device: str | None = None) -> None:
    """Start a detached ``python -m train resume NAME``; refuse a run that is still active or finished."""
    store = RunStore()
    run = store.get_run(name)
    if run["state"] in ACTIVE_STATES:
        raise RunStoreError(f"Run {name!r} is still {run['state']}; stop it before resuming.")
    if run["state"] == "finished":
        raise RunStoreError(f"Run {name!r} has already finished; there is nothing to resume.")
    refuse_live_trainer(run)
    from train.engine import find_resume_point, other_world  # here: the engine imports torch

    config = parse_config(run["config"], data_root=None, check_data=False)
    refusal = other_world(config, name, find_resume_point(config, name), world=1)  # the app starts one process
    if refusal:
        raise RunStoreError(refusal)
    store.set_state(name, "queued")
    args = ["resume", name] + (["--device", device] if device else [])
    _spawn(name, args, store)


def trainer_alive(run: dict[str, Any]) -> bool:
    """Whether the process recorded as the run's trainer is still alive (a reused pid is not)."""
    return pid_alive(run.get("pid"), run.get("pid_started"))


def refuse_live_trainer(run: dict[str, Any], own_pid: int | None = None, doing: str = "resuming") -> None:
    """Raise ``RunStoreError`` when a live process other than ``own_pid`` still owns the run (even one that
    stopped reporting, e.g. paused with SIGSTOP): resuming would start a second trainer on the same files,
    deleting would pull them from under it. A trainer that stored its ending but still holds the run's lock (it is
    shutting down) is waited for, up to ``TRAINER_EXIT_S``.

    The one liveness check of ``resume`` and ``delete`` for both the app and the command line (which passes its
    own pid: the app records the pid of the ``resume`` process it starts).
    """
    if has_live_trainer(run, own_pid):
        how = "is still running" if run["state"] in ACTIVE_STATES else "has a live trainer that stopped reporting"
        raise RunStoreError(f"Run {run['name']!r} {how} (pid {run['pid']}); stop it before {doing}.")
    other = run.get("pid") not in (None, own_pid, os.getpid())  # this process: it trained the run in-process
    if other and not _lock_freed(run):
        raise RunStoreError(f"Run {run['name']!r} has ended, but its trainer (pid {run['pid']}) still holds it "
                            f"{TRAINER_EXIT_S:.0f} s later; try {doing} again when it has exited.")


def _lock_freed(run: dict[str, Any]) -> bool:
    """Whether the run's trainer lock is free, or freed within ``TRAINER_EXIT_S``: after storing its ending a
    trainer still shuts its workers down before it lets go of the run."""
    deadline = time.monotonic() + TRAINER_EXIT_S
    while trainer_alive(run) and trainer_lock_held(run["name"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def has_live_trainer(run: dict[str, Any], own_pid: int | None = None) -> bool:
    """Whether a live process other than ``own_pid`` is recorded as training the run, reporting or not."""
    return run["stored_state"] in ACTIVE_STATES and run.get("pid") not in (None, own_pid) and trainer_alive(run)


def _spawn(name: str, args: list[str], store: RunStore) -> subprocess.Popen:
    log = log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(paths.REPO_ROOT), env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "train", *args], cwd=paths.REPO_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            store.set_state(name, "failed", error=f"The trainer could not be started: {exc}.")
            raise RunStoreError(f"The trainer for run {name!r} could not be started: {exc}.") from exc
    store.set_spawned_pid(name, process.pid)
    return process


def stop(name: str, sig: int = signal.SIGTERM) -> bool:
    """Ask run ``name``'s trainer to stop (SIGTERM: it saves ``last.pt``); True if a signal was sent.

    A queued run is marked ``stopped`` at once (its trainer, if it has not taken the run over
    yet, then exits without training); a run whose process is gone is marked ``stopped`` too.
    """
    store = RunStore()
    run = store.get_run(name)
    pid = run.get("pid")
    if run["state"] not in ACTIVE_STATES:
        return False
    if run["stored_state"] == "queued" or not trainer_alive(run):
        store.set_state(name, "stopped")
    if not trainer_alive(run):
        return False
    try:  # the trainer only: it stops its DataLoader workers itself after saving
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def kill(name: str) -> bool:
    """SIGKILL the whole process group of a detached run (for a trainer that ignores ``stop``)."""
    run = RunStore().get_run(name)
    pid = run.get("pid")
    if run["stored_state"] not in ACTIVE_STATES or not trainer_alive(run):
        return False  # a finished run's old pid may belong to another process by now
    try:
        os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def tail_log(name: str, lines: int = 40) -> str:
    """The last ``lines`` lines of the run's log ('' when there is none); progress-bar redraws collapse."""
    log = log_path(name)
    if not log.is_file():
        return ""
    with open(log, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024 * max(1, lines // 40)))
        data = handle.read().decode("utf-8", errors="replace")
    kept: deque[str] = deque(maxlen=lines)
    for line in data.rstrip("\n").split("\n"):
        kept.append(line.rstrip("\r").rsplit("\r", 1)[-1])
    return "\n".join(kept)


def disk_usage(name: str) -> int:
    """Bytes the run's folder takes (checkpoints, log, config)."""
    return folder_bytes(paths.run_dir(name))


def check_deletable(run: dict[str, Any]) -> None:
    """``RunStoreError`` when the run is queued or running, or its trainer is alive though silent."""
    if run["state"] in ACTIVE_STATES:
        raise RunStoreError(f"Run {run['name']!r} is still {run['state']}; stop it before deleting it.")
    refuse_live_trainer(run, doing="deleting it")


def delete(name: str) -> int:
    """Delete run ``name`` for good: its folder and everything the store holds about it; returns the bytes freed.

    A queued or running run is refused (stop it first); so is a name the store does not know.
    """
    store = RunStore()
    check_deletable(store.get_run(name))
    freed = disk_usage(name)
    store.delete_run(name)
    shutil.rmtree(paths.run_dir(name), ignore_errors=True)
    return freed
