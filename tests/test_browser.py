"""End to end in a real headless Chromium: `streamlit run app.py` on a free loopback port against a temporary
ResLens home holding a small checkpoint; upload an image through the Explain page's file input and see the
predictions and an overlay appear, click a row of its top-5 table to explain that class, and download the zip of
everything. Screenshots are saved in the test's temporary folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import app_fixtures as fx

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
WAIT_MS = 90_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture()
def server(tmp_path):
    """The app served on a free loopback port against this test's RESLENS_HOME (set by conftest)."""
    fx.finished_run()
    with fx.serve_app(tmp_path / "streamlit.log") as url:
        yield url


def test_upload_an_image_and_see_predictions_and_overlay(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = tmp_path / "red_square.png"
    image.write_bytes(fx.png_bytes(96))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)  # clicks, uploads and page loads wait as long as the checks
            page.goto(f"{server}/explain")
            page.locator('input[type="file"]').set_input_files(str(image))
            expect(page.get_by_role("heading", name="red_square.png")).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=WAIT_MS)  # run ended
            # the samples shown before the upload leave the page once the rerun ends: one image explained
            expect(page.get_by_text("Explaining")).to_have_count(1, timeout=WAIT_MS)
            expect(page.get_by_text("Explaining")).to_be_visible(timeout=WAIT_MS)
            # a sample's table left from the run the upload interrupted goes once the new run ends: one table
            expect(page.get_by_test_id("stDataFrame")).to_have_count(1, timeout=WAIT_MS)
            expect(page.get_by_test_id("stDataFrame")).to_be_visible(timeout=WAIT_MS)  # the top-5 table
            overlay = page.get_by_test_id("stImage").filter(has_text="layer")  # the recommended layer's overlay
            expect(overlay.locator("img")).to_be_visible(timeout=WAIT_MS)
            assert overlay.locator("img").evaluate("img => img.naturalWidth") > 96  # a rendered PNG, enlarged
            assert page.get_by_test_id("stException").count() == 0
            page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
            clicked = click_second_row(page, expect)
            with page.expect_download(timeout=WAIT_MS) as download:
                page.get_by_role("button", name="Download everything (zip)").click()
            saved = tmp_path / "everything.zip"
            download.value.save_as(saved)
            page.goto(server)
            expect(page.get_by_text("Explain an image")).to_be_visible(timeout=WAIT_MS)
            page.screenshot(path=str(tmp_path / "home.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "explain.png").stat().st_size > 10_000
    import json
    import zipfile

    bundle = zipfile.ZipFile(saved)
    names = bundle.namelist()
    assert f"maps/red-square_layer2_gradcam_{clicked}.png" in names  # the clicked class, at the recommended layer
    assert f"maps/red-square_layer2_gradcam_{clicked}.npy" in names
    assert json.loads(bundle.read("predictions.json"))["images"][0]["explained_class"] == clicked
    assert "predictions.csv" in names


def click_second_row(page, expect) -> str:
    """Click the second row of the top-5 table (a canvas grid: by position) and return the class now explained,
    which must differ from the top-1 explained before."""
    import re

    explaining = page.get_by_text(re.compile(r"^Explaining "))
    before = explaining.inner_text()
    table = page.get_by_test_id("stDataFrame")
    box = table.bounding_box()
    row_height = 35  # Streamlit's default row height, header included
    page.mouse.click(box["x"] + 12, box["y"] + row_height * 1.5 + row_height)  # the second row's marker
    expect(explaining).not_to_have_text(before, timeout=WAIT_MS)
    after = explaining.inner_text()
    clicked = re.match(r"Explaining (.+) \(", after).group(1)
    expect(page.get_by_text(re.compile(r"^Explaining "))).to_have_count(1, timeout=WAIT_MS)
    return clicked


def test_train_monitor_and_classes_controls_in_a_real_browser(server, tmp_path):
    """Issue 12's controls as a person meets them: editor switches and hidden columns, YAML save, the range test,
    run management with Delete and the config; the Classes page's top-5, precision/F1 and count toggle."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)  # clicks, uploads and page loads wait as long as the checks
            page.goto(f"{server}/train")
            for text in ("Mixed precision (amp)", "channels_last", "torch.compile", "Show every column",
                         "Save as YAML", "Find a learning rate (range test)", "Config of this run"):
                expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("hidden columns", exact=False).first).to_be_visible(timeout=WAIT_MS)
            page.get_by_role("button", name="Delete").first.click()
            expect(page.get_by_text("Delete for good")).to_be_visible(timeout=WAIT_MS)
            page.screenshot(path=str(tmp_path / "train.png"), full_page=True)
            page.goto(f"{server}/classes")
            expect(page.get_by_text("Top-5 accuracy")).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("Row-normalised")).to_be_visible(timeout=WAIT_MS)
            page.goto(f"{server}/monitor")
            expect(page.get_by_text("Learning rate (per step)").first).to_be_visible(timeout=WAIT_MS)
            assert page.get_by_test_id("stException").count() == 0
        finally:
            browser.close()
