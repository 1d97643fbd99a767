"""The Explain page: uploads (good and broken), built-in samples, predictions and overlays, and caching
(the model loads once per checkpoint; opacity and colormap never rerun the network)."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests import app_fixtures as fx


@pytest.fixture()
def explain_page():
    fx.finished_run()
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    at.switch_page("pages/explain.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def _cards(at: AppTest) -> dict[str, object]:
    return {s.value: s for s in at.subheader}


def test_builtin_samples_are_explained_with_no_upload(explain_page):
    at = explain_page
    assert len(at.subheader) == 3  # three samples chosen by default
    # per sample: the original and one overlay (layer4) with its download button
    assert len(at.image) == 6 and len(at.download_button) == 3
    assert all(len(df.value) == 5 for df in at.dataframe)  # top-5 predictions
    assert all(abs(df.value["probability"].sum()) <= 1.0 + 1e-6 for df in at.dataframe)


def test_upload_good_and_broken_files_each_get_their_own_answer(explain_page):
    at = explain_page
    at.file_uploader[0].set_value([("square.png", fx.png_bytes(80), "image/png"),
                                   ("notes.jpg", b"this is not a picture", "image/jpeg")]).run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["square.png", "notes.jpg"]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "notes.jpg" in errors[0]
    assert "Traceback" not in errors[0]
    assert any(m.value.startswith("Explaining **") for m in at.markdown)
    assert len(at.download_button) == 1  # the good file's overlay only
    assert at.download_button[0].proto.label == "Download PNG"


def test_two_uploads_with_the_same_name_both_show(explain_page):
    at = explain_page
    same = fx.png_bytes(80)
    at.file_uploader[0].set_value([("photo.png", same, "image/png"), ("photo.png", same, "image/png")]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [s.value for s in at.subheader] == ["photo.png", "photo.png"] and len(at.download_button) == 2


def test_sliders_rerender_without_running_the_network(explain_page, monkeypatch):
    import core.checkpoints
    import core.gradcam

    calls = {"explain": 0, "load": 0}
    real_explain, real_load = core.gradcam.explain, core.checkpoints.load_model

    def counting_explain(*args, **kwargs):
        calls["explain"] += 1
        return real_explain(*args, **kwargs)

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return real_load(*args, **kwargs)

    import pages.cam

    real_input = pages.cam._input

    def counting_input(*args, **kwargs):  # every prediction or map starts here
        calls["input"] = calls.get("input", 0) + 1
        return real_input(*args, **kwargs)

    monkeypatch.setattr(core.gradcam, "explain", counting_explain)
    monkeypatch.setattr(core.checkpoints, "load_model", counting_load)
    monkeypatch.setattr(pages.cam, "_input", counting_input)
    at = explain_page
    at.file_uploader[0].set_value(("square.png", fx.png_bytes(80), "image/png")).run()
    assert calls["explain"] == 1 and calls["load"] == 0  # the model was loaded once, before (cache_resource)
    inputs_before, overlay_before = calls["input"], at.image[1].value
    at.sidebar.slider[0].set_value(0.9).run()
    at.sidebar.selectbox[2].set_value("viridis" if "viridis" in at.sidebar.selectbox[2].options else
                                      at.sidebar.selectbox[2].options[-1]).run()
    assert calls["explain"] == 1 and at.image[1].value != overlay_before  # re-rendered from the cached map
    assert calls["input"] == inputs_before  # neither prediction nor map ran again
    assert [m.label.split(" ")[0] for m in at.sidebar.multiselect] == ["stem", "layer1", "layer2", "layer3",
                                                                       "layer4"]  # grouped by stage
    at.multiselect(key="layers-layer3").set_value(["layer3"]).run()
    assert calls["explain"] == 2 and len(at.download_button) == 2
    assert calls["load"] == 0
