"""Stop signals: what SIGTERM, SIGINT and SIGHUP do to a trainer, its DataLoader workers and the other commands.

A process manager (``timeout``, ``docker stop``, systemd, ``kill -- -PGID``) or a closed terminal signals the
whole process group, DataLoader workers included. Workers therefore ignore the stop signals
(``worker_init_fn()``): the main process decides, finishes its step, saves ``last.pt`` and shuts its
workers down (at exit it tells any worker still alive to leave, with ``LEAVE_SIGNAL``). While a checkpoint is written (``StopFlag.held``) a signal is only
recorded, never acted on inside ``torch.save``. Commands other than training turn SIGTERM/SIGHUP into
``Terminated`` (``raise_on_stop``), so their clean-up runs and they exit with one line.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - imported first, so its exit handler runs after ours
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived in a command that has nothing to save; clean-up runs, then it exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


LEAVE_SIGNAL = signal.SIGUSR1  # what a trainer sends its workers at exit (they ignore SIGTERM)
_leave_registered = threading.Lock()


def ignore_in_worker(worker_id: int = 0) -> None:
    """In a DataLoader worker: leave stop signals to the main process; leave when it says so (``LEAVE_SIGNAL``).

    Workers started by ``start_workers`` begin with the stop signals blocked; one that arrived before this ran
    is pending, and is dropped once ignored here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(LEAVE_SIGNAL, _leave)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)``, with the stop signals blocked while its workers are forked, so that a stop sent to the
    process group while a worker is still starting (before ``ignore_in_worker``) cannot kill it; the main
    process receives a signal sent meanwhile as soon as the workers exist."""
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave(signum: int, frame: Any) -> None:
    os._exit(0)


def worker_init_fn() -> Callable[[int], None]:
    """The ``worker_init_fn`` for a DataLoader of this process (``ignore_in_worker``).

    multiprocessing ends daemonic workers at exit with SIGTERM, which these workers ignore, and torch shuts
    them down only when its iterator is freed (an exception's traceback can keep it alive): so this process,
    at exit and before multiprocessing joins them, tells every worker still alive to leave.
    """
    if _leave_registered.acquire(blocking=False):
        atexit.register(_workers_leave)  # after multiprocessing.util's own: atexit runs it first
    return ignore_in_worker


def _workers_leave() -> None:
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, LEAVE_SIGNAL)
        except (ProcessLookupError, TypeError):
            pass


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextmanager
def raise_on_stop() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise ``Terminated`` in the main thread (SIGINT keeps raising
    KeyboardInterrupt); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP (main thread only); the trainer checks it after each step.

    A second SIGINT (Ctrl-C twice) aborts at once, except inside ``held()``, where it waits for the block's end.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}
        self._holding = False
        self._abort_pending = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C aborts at once
            if self._holding:
                self._abort_pending = True
                return
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def held(self, abort: bool = True) -> Iterator[None]:
        """Run the block (a checkpoint write) without any stop signal acting inside it. A second Ctrl-C that came
        meanwhile aborts after the block, or is dropped without ``abort`` (a block that ended the run)."""
        main = threading.current_thread() is threading.main_thread()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if main else None
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # pending signals are handled here
        if self._abort_pending:
            self._abort_pending = False
            if abort:
                raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
