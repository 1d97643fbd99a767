"""Every page renders with an empty store, a finished run and a running one, without an exception or an
error box; and the things each page must say are there (AppTest runs the real scripts in-process)."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests import app_fixtures as fx

PAGES = ("pages/home.py", "pages/train.py", "pages/monitor.py", "pages/classes.py", "pages/explain.py")


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [e.value for e in at.info] + [e.value for e in at.success]
    parts += [e.value for e in at.warning] + [e.value for e in at.error] + [c.value for c in at.caption]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_pages_render_with_an_empty_store(page):
    at = open_page(page)
    assert not at.error, [e.value for e in at.error]


def test_pages_render_with_a_finished_run():
    fx.finished_run()
    for page in PAGES:
        at = open_page(page)
        assert not at.error, (page, [e.value for e in at.error])


def test_pages_render_with_a_running_run():
    fx.running_run()
    for page in PAGES:
        at = open_page(page)
        assert not at.error, (page, [e.value for e in at.error])


def test_home_offers_the_demo_when_nothing_is_trained(monkeypatch):
    launched = []
    from train import jobs

    monkeypatch.setattr(jobs, "launch", lambda config, **kw: launched.append(config) or "demo")
    at = open_page("pages/home.py")
    assert "Nothing has been trained yet" in texts(at)
    assert {m.label: m.value for m in at.metric}["Checkpoints"] == "0"
    at.button[0].click().run()
    assert [str(p) for p in launched] == [str(fx.REPO / "train" / "configs" / "demo.yaml")]
    assert at.title[0].value == "Monitor"  # the button took the user to the live curves


def test_home_counts_runs_and_checkpoints_and_points_to_explain():
    fx.finished_run()
    at = open_page("pages/home.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Runs"] == "1" and metrics["Checkpoints"] == "1"
    assert "Explain an image" in [b.label for b in at.button]
    assert "demo-done" in at.dataframe[0].value["run"].tolist()
