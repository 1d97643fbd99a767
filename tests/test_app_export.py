"""The Monitor page offers each shown run's best model to take away (TorchScript, ONNX or safetensors zip)."""
from __future__ import annotations

import pytest

from tests import app_fixtures as fx
from tests.test_app_pages import open_page

pytestmark = pytest.mark.usefixtures("live_heartbeats")  # the stand-in trainer beats once (conftest.py)


def test_monitor_offers_the_best_model_for_download():
    fx.finished_run()
    fx.running_run()  # no checkpoint: no button
    at = open_page("pages/monitor.py")
    at.multiselect[0].set_value(["demo-done", "demo-live"]).run()
    assert not at.exception and not at.error
    assert [b.proto.label for b in at.download_button] == ["Download demo-done (torchscript)"]
    at.segmented_control(key="export_format").set_value("ONNX (onnxruntime)").run()
    button = at.download_button(key="export-demo-done")
    assert button.proto.label == "Download demo-done (onnx)"
    assert any("export-model" in c.value for c in at.caption)

