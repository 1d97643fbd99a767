import socket

import pytest

from core import paths


def test_home_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLENS_HOME", str(tmp_path))
    assert paths.reslens_home() == tmp_path.resolve()
    assert paths.store_path().parent == tmp_path.resolve()


@pytest.mark.parametrize("bad", ["../../x", "/etc/passwd", "a/b", "", "..", "x" * 65, "name with space", "é"])
def test_bad_run_names_refused(bad):
    with pytest.raises(ValueError):
        paths.run_dir(bad)


def test_good_run_name_stays_inside():
    d = paths.run_dir("demo-1.v2_x")
    assert paths.runs_dir() in d.parents


@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "a/../../x", "a\x00b"])
def test_resolve_inside_refuses_escapes(tmp_path, bad):
    with pytest.raises(ValueError):
        paths.resolve_inside(tmp_path, bad)


def test_resolve_inside_accepts_nested(tmp_path):
    assert paths.resolve_inside(tmp_path, "a/b/../c") == (tmp_path / "a" / "c").resolve()


def test_network_is_refused_in_tests():
    s = socket.socket()
    try:
        with pytest.raises(RuntimeError, match="network"):
            s.connect(("203.0.113.1", 80))
    finally:
        s.close()
