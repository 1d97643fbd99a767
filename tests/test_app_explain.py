"""The Explain page: uploads (good and broken), built-in samples, predictions and overlays, caching (the model
loads once per checkpoint; opacity, colormap and colour scale never rerun the network), a class per image, the
out-of-distribution verdict, the shared scale, Score-CAM/Eigen-CAM with smoothing, and the zip of everything."""
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
    # per sample: the original and one overlay (the recommended layer) with its download button; plus the zip
    assert len(at.image) == 6 and len(at.download_button) == 3 + 1
    assert all(len(df.value) == 5 for df in at.dataframe)  # top-5 predictions
    assert all(abs(df.value["probability"].sum()) <= 1.0 + 1e-6 for df in at.dataframe)


def test_upload_good_and_broken_files_each_get_their_own_answer(explain_page):
    at = explain_page
    at.file_uploader[0].set_value([("square.png", fx.png_bytes(80), "image/png"),
                                   ("notes.jpg", b"this is not a picture", "image/jpeg"),
                                   ("strip.png", fx.png_bytes(1500, height=1), "image/png")]).run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["square.png", "notes.jpg", "strip.png"]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "notes.jpg" in errors[0]  # a picture 1 px high is shown (framed), not an error
    assert "Traceback" not in errors[0]
    assert sum(m.value.startswith("Explaining **") for m in at.markdown) == 2
    assert [b.proto.label for b in at.download_button] == ["Download everything (zip)"] + ["Download PNG"] * 2


def test_two_uploads_with_the_same_name_both_show(explain_page):
    at = explain_page
    same = fx.png_bytes(80)
    at.file_uploader[0].set_value([("photo.png", same, "image/png"), ("photo.png", same, "image/png")]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [s.value for s in at.subheader] == ["photo.png", "photo.png"] and len(at.download_button) == 2 + 1


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
    at.slider(key="explain_opacity").set_value(0.9).run()
    at.selectbox(key="explain_colormap").set_value("viridis").run()
    assert calls["explain"] == 1 and at.image[1].value != overlay_before  # re-rendered from the cached map
    at.radio(key="explain_scale").set_value("shared").run()
    assert calls["explain"] == 1 and "shared scale: 1 = " in at.image[1].proto.imgs[0].caption
    assert calls["input"] == inputs_before  # neither prediction nor map ran again
    assert [m.label.split(" ")[0] for m in at.sidebar.multiselect][1:] == ["stem", "layer1", "layer2", "layer3",
                                                                       "layer4"]  # grouped by stage
    at.multiselect(key="layers-layer3").set_value(["layer3"]).run()
    assert calls["explain"] == 2 and len(at.download_button) == 2 + 1
    assert calls["load"] == 0


def _class_boxes(at: AppTest) -> list:
    return [box for box in at.selectbox if box.label == "Class to explain"]


def _explaining(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("Explaining **")]


def test_each_image_has_its_own_class(explain_page):
    at = explain_page
    boxes = _class_boxes(at)
    assert len(boxes) == 3 and all(box.value == "the top-1 prediction" for box in boxes)
    before = _explaining(at)
    other = next(c for c in boxes[1].options[1:] if f"**{c}**" not in before[1])
    boxes[1].set_value(other).run()  # typed / searched in the second image's box only
    after = _explaining(at)
    assert not at.exception and after[0] == before[0] and after[2] == before[2]
    assert after[1].startswith(f"Explaining **{other}**")
    tables = at.dataframe
    assert len(tables) == 3 and all(t.proto.selection_mode for t in tables)  # rows can be clicked


def test_another_kind_of_model_gets_its_own_layer_defaults(explain_page):
    from core import paths

    at = explain_page
    small = at.selectbox(key="explain_checkpoint").value
    large = fx.make_checkpoint(paths.reslens_home() / "exported" / "large.pt", image_size=128)
    at = AppTest.from_file(fx.APP, default_timeout=90).run()  # a fresh session lists the new file
    at.switch_page("pages/explain.py").run()
    at.selectbox(key="explain_checkpoint").set_value(small).run()

    def chosen() -> list[str]:
        return [v for m in at.sidebar.multiselect if m.key.startswith("layers-") for v in m.value]

    assert chosen() == ["layer2"]  # 8x8 maps at 64 px
    at.multiselect(key="layers-layer1").set_value(["layer1.0.conv1"]).run()
    at.selectbox(key="explain_checkpoint").set_value(large).run()
    assert not at.exception and chosen() == ["layer3"]  # 8x8 maps at 128 px: its own default, nothing stale
    at.selectbox(key="explain_checkpoint").set_value(small).run()
    assert chosen() == ["layer2"]


def test_without_thresholds_the_page_says_how_to_add_them(explain_page):
    assert any("ood-thresholds" in c.value for c in explain_page.caption)


def test_an_image_unlike_the_validation_set_is_flagged_in_words(explain_page):
    from core import paths
    from core.checkpoints import load_checkpoint, save_checkpoint

    best = paths.run_dir("demo-done") / "stage2-finetune" / "best.pt"
    impossible = {"keep": 0.95, "val_images": 10, "msp_threshold": 1.0, "energy_threshold": 1e6,
                  "msp_quantiles": [1.0] * 101, "energy_quantiles": [1e6] * 101}  # nothing reaches these
    save_checkpoint(best, {**load_checkpoint(best), "ood": impossible})
    at = explain_page.run()
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 3 and all(w.startswith("Out of distribution") for w in warnings)


def test_score_cam_and_eigen_cam_with_smoothing(explain_page):
    at = explain_page
    smoothing = at.multiselect(key="explain_smoothing")
    # both smoothings with Eigen-CAM; Score-CAM (a forward per channel, times each augmentation) with eigen only
    for label, chosen in (("Eigen-CAM (class-agnostic)", list(smoothing.options)),
                          ("Score-CAM (gradient-free, slow)", [smoothing.options[-1]])):
        at.multiselect(key="explain_smoothing").set_value(chosen)
        at.selectbox(key="explain_method").set_value(label).run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert len(at.image) == 6 and all(f"with {label}" in m for m in _explaining(at))


def test_the_zip_holds_every_map_and_the_predictions(explain_page, monkeypatch):
    import io
    import json
    import zipfile

    import numpy as np

    import core.explain_files

    built = []
    real = core.explain_files.bundle_zip
    monkeypatch.setattr(core.explain_files, "bundle_zip", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    at = explain_page
    at.multiselect(key="layers-layer1").set_value(["layer1"]).run()
    names = zipfile.ZipFile(io.BytesIO(built[-1])).namelist()
    bundle = zipfile.ZipFile(io.BytesIO(built[-1]))
    report = json.loads(bundle.read("predictions.json"))
    assert len(report["images"]) == 3 and report["method"] == "gradcam"
    for record in report["images"]:
        stem = record["image"].rsplit(".", 1)[0].replace("_", "-")  # '_' separates the parts of a name
        for layer in ("layer1", "layer2"):
            base = f"maps/{stem}_{layer}_gradcam_{record['explained_class']}"
            assert f"{base}.png" in names and f"{base}.npy" in names
            values = np.load(io.BytesIO(bundle.read(f"{base}.npy")))
            assert values.shape == (64, 64) and values.dtype == np.float32
    assert bundle.read("predictions.csv").decode().count("\n") == 1 + 3 * 5
    assert at.download_button(key="explain_zip").proto.label == "Download everything (zip)"


def test_an_upload_is_hashed_once_per_rerun(explain_page, monkeypatch):
    """Its digest keys the image, logits and map caches and its class box: computed once per rerun, passed down."""
    import hashlib

    upload = fx.png_bytes(80)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: hashed.append(bool(a) and a[0] == upload) or real(*a, **k))
    at = explain_page
    at.file_uploader[0].set_value(("square.png", upload, "image/png")).run()  # first seen: model and maps run
    assert not at.exception and not at.error and len(at.image) == 2, [e.value for e in at.error]
    assert hashed.count(True) == 1
    hashed.clear()
    at.slider(key="explain_opacity").set_value(0.9).run()  # a rerun served from the caches
    assert not at.exception and hashed.count(True) == 1


def _second_checkpoint(at: AppTest):
    """Another checkpoint next to the run's, chosen in a fresh session (which lists it); returns (page, both)."""
    from core import paths

    other = fx.make_checkpoint(paths.reslens_home() / "exported" / "other.pt")
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    at.switch_page("pages/explain.py").run()
    return at, other


def test_an_unreadable_checkpoint_keeps_the_uploads_and_the_sidebar(explain_page):
    at, other = _second_checkpoint(explain_page)
    at.file_uploader[0].set_value(("square.png", fx.png_bytes(80), "image/png")).run()
    at.selectbox(key="explain_method").set_value("LayerCAM").run()
    at.selectbox(key="explain_checkpoint").set_value(other).run()
    other.write_bytes(b"not a checkpoint any more")  # damaged on disk while chosen
    at.run()
    assert [e.value for e in at.error] and "is not a readable PyTorch file" in at.error[0].value
    assert at.selectbox(key="explain_method").value == "LayerCAM"
    good = next(p for p in at.selectbox(key="explain_checkpoint").options if "other.pt" not in p)
    at.selectbox(key="explain_checkpoint").set_value(good).run()
    assert not at.exception and [s.value for s in at.subheader] == ["square.png"]  # the upload is still there
    assert at.selectbox(key="explain_method").value == "LayerCAM" and "with LayerCAM" in _explaining(at)[0]


def test_a_checkpoint_deleted_while_chosen_is_said_not_replaced(explain_page):
    at, other = _second_checkpoint(explain_page)
    at.selectbox(key="explain_checkpoint").set_value(other).run()
    other.unlink()
    at.run()
    assert any(w.value.startswith(f"The checkpoint you chose, {other}, is no longer there") for w in at.warning)
    assert not _explaining(at)  # no other model explains in its place
    at.selectbox(key="explain_checkpoint").set_value(at.selectbox(key="explain_checkpoint").options[0]).run()
    assert _explaining(at) and not any("no longer there" in w.value for w in at.warning)


def test_a_class_typed_in_the_box_unticks_the_table(explain_page):
    """A row ticked before still looked chosen after a class was typed, and clicking it again did nothing."""
    at = explain_page
    first, second = at.dataframe[0].proto.id, at.dataframe[1].proto.id
    box = _class_boxes(at)[1]
    box.set_value(box.options[2]).run()
    assert at.dataframe[1].proto.id != second  # drawn anew, no row ticked
    assert at.dataframe[0].proto.id == first  # the other images' tables keep their selection
