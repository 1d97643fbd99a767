"""The server's safe defaults in .streamlit/config.toml (issue 6, 'The server')."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core.images import MAX_FILE_BYTES

CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"


def _config() -> dict:
    return tomllib.loads(CONFIG.read_text())


def test_server_listens_on_loopback_only_with_xsrf_and_no_run_on_save():
    server = _config()["server"]
    assert server["address"] == "127.0.0.1"
    assert server["enableXsrfProtection"] is True
    assert server["runOnSave"] is False
    assert server["headless"] is True
    assert server["allowedHosts"] == ["localhost", "127.0.0.1"]  # no DNS rebinding onto the local app


def test_no_usage_statistics_and_no_tracebacks_in_the_page():
    config = _config()
    assert config["browser"]["gatherUsageStats"] is False
    assert config["client"]["showErrorDetails"] == "none"


def test_sidebar_lists_only_real_pages():
    """Helper modules in pages/ (common.py, cam.py) must not appear as pages: the app draws its own links."""
    from pages import common

    assert _config()["client"]["showSidebarNavigation"] is False
    root = CONFIG.parent.parent
    assert {script for script, _, _ in common.NAVIGATION} == {"app.py"} | {
        f"pages/{p.name}" for p in (root / "pages").glob("*.py") if p.name not in ("common.py", "cam.py")}


def test_upload_limit_matches_what_the_decoder_accepts():
    assert _config()["server"]["maxUploadSize"] * 1024 * 1024 == MAX_FILE_BYTES


def test_streamlit_reads_the_same_values(monkeypatch):
    """Streamlit itself parses the file from the app's folder: the option names exist in this version."""
    from streamlit import config as st_config

    monkeypatch.chdir(CONFIG.parent.parent)
    try:
        st_config.get_config_options(force_reparse=True)
        assert st_config.get_option("server.address") == "127.0.0.1"
        assert st_config.get_option("browser.gatherUsageStats") is False
        assert st_config.get_option("server.enableXsrfProtection") is True
        assert st_config.get_option("server.maxUploadSize") * 1024 * 1024 == MAX_FILE_BYTES
        assert st_config.get_option("server.runOnSave") is False
        assert st_config.get_option("client.showErrorDetails") == "none"
    finally:
        monkeypatch.undo()
        st_config.get_config_options(force_reparse=True)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_the_running_server_listens_on_loopback_and_refuses_foreign_hosts(tmp_path):
    import http.client
    from urllib.parse import urlparse

    from tests import app_fixtures as fx

    with fx.serve_app(tmp_path / "streamlit.log") as url:
        port = urlparse(url).port
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, no 0.0.0.0 or ::
        statuses = {}
        for host in (f"127.0.0.1:{port}", "rebound.example.com"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/_stcore/stream", headers={
                "Host": host, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            statuses[host] = conn.getresponse().status
            conn.close()
        assert statuses == {f"127.0.0.1:{port}": 101, "rebound.example.com": 403}
