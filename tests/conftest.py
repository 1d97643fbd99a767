"""Shared test set-up: every test gets its own ResLens home and data root, and no network."""
from __future__ import annotations

import socket

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make every test slower.
torch.set_num_threads(1)

_real_connect = socket.socket.connect
_LOOPBACK = ("127.", "::1", "localhost")


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith(_LOOPBACK) or self.family == socket.AF_UNIX):
        return _real_connect(self, address)
    raise RuntimeError(f"Tests must not touch the network (tried to connect to {address!r}).")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Point RESLENS_HOME/RESLENS_DATA at temporary folders and refuse non-loopback sockets."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("RESLENS_HOME", str(home))
    monkeypatch.setenv("RESLENS_DATA", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield home


@pytest.fixture
def live_heartbeats(monkeypatch):
    """Runs whose trainer is this test (``tests.app_fixtures.running_run`` beats once, a real trainer every 2 s)
    stay live however slow a loaded machine makes the test: their heartbeat never goes stale."""
    from core import run_store

    monkeypatch.setattr(run_store, "STALE_AFTER_S", float("inf"))
