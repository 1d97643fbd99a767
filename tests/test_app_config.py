"""The server's safe defaults in .streamlit/config.toml (issue 6, 'The server')."""
from __future__ import annotations

import tomllib
from pathlib import Path

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
