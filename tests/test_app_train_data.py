"""The Train page and data on disk: a stage's root is what the missing-data check looks at (issue 12, defect 1),
and your own images (a folder, or a .zip unpacked safely) come with their data report before Launch."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import paths
from tests import app_fixtures as fx
from tests.data_fixtures import IMAGEFOLDER_SIZES, make_caltech101, make_imagefolder, zip_folder

EMPTY, IMAGES = "(empty pipeline)", "(my images: one stage)"


def train_page(source: str) -> AppTest:
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    at.switch_page("pages/train.py").run()
    at.selectbox[0].set_value(source).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def launch_button(at: AppTest):
    return next(b for b in at.button if b.label == "Launch")


def warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


@pytest.fixture
def launched(monkeypatch) -> list[dict]:
    from train import jobs

    calls: list[dict] = []
    monkeypatch.setattr(jobs, "launch", lambda config, **kw: calls.append(config) or "my-images")
    return calls


def test_a_stage_root_is_where_the_page_looks_for_its_data(tmp_path):
    """Defect 12.1: with the data set under the stage's root (not the data root) the page finds it."""
    elsewhere = make_caltech101(tmp_path / "elsewhere")
    at = train_page(EMPTY)
    at.session_state[f"stages-{EMPTY}"] = {"edited_rows": {0: {"dataset": "caltech101", "root": str(elsewhere)}},
                                           "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.error, [e.value for e in at.error]
    assert not any("Caltech-101" in w for w in warnings(at)), warnings(at)
    assert not launch_button(at).disabled
    at.session_state[f"stages-{EMPTY}"] = {"edited_rows": {0: {"dataset": "caltech101", "root": "nowhere"}},
                                           "added_rows": [], "deleted_rows": []}
    at.run()  # a root under the data root that lacks it: the warning names the folder the trainer would open
    expected = paths.data_root() / "nowhere" / "caltech101" / "101_ObjectCategories"
    assert any(f"looked for {expected}" in w for w in warnings(at)), warnings(at)
    assert launch_button(at).disabled


def test_a_folder_of_images_gets_its_data_report_and_launches(tmp_path, launched):
    folder = make_imagefolder(tmp_path / "pets", "split")
    at = train_page(IMAGES)  # nothing chosen yet: where to choose the images, not an error
    assert not at.error and any("Stage 1 trains on your own images: type their folder or drop a .zip" in i.value
                                for i in at.info), [e.value for e in at.error]
    assert launch_button(at).disabled
    at.text_input(key="images_folder").set_value(str(folder)).run()
    assert not at.error, [e.value for e in at.error]
    report = at.code[0].value
    assert f"Image folder (imagefolder) at {folder}" in report and "classes: 3" in report
    assert "note: Split: the train/ and val/ folders" in report
    rows = next(d.value for d in at.dataframe if "class" in d.value.columns)
    assert rows["class"].tolist() == sorted(IMAGEFOLDER_SIZES) and rows["train"].tolist() == [5, 4, 3]
    launch_button(at).click().run()
    (config,) = launched
    assert (config["stages"][0]["dataset"], config["stages"][0]["root"]) == ("imagefolder", str(folder))


def test_a_folder_that_is_not_an_image_folder_blocks_launch(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        (tmp_path / "flat" / f"{i}.png").write_bytes(fx.png_bytes())
    at = train_page(IMAGES)
    at.text_input(key="images_folder").set_value(str(tmp_path / "flat")).run()
    errors = [e.value for e in at.error]
    assert any("3 images lie directly in it, outside any class folder" in e for e in errors), errors
    assert launch_button(at).disabled and not at.exception


def test_a_folder_with_an_unreadable_image_blocks_launch_unless_the_stage_skips_them(tmp_path, launched):
    """The data report finds it; the run would stop at it, so Launch waits for it to go or be skipped."""
    folder = make_imagefolder(tmp_path / "pets")
    broken = sorted((folder / "cat").glob("cat_*"))[0]
    broken.write_text("not an image")
    at = train_page(IMAGES)
    at.text_input(key="images_folder").set_value(str(folder)).run()
    errors = [e.value for e in at.error]
    assert any(e.startswith(f"1 image(s) under {folder} cannot be read, so the run would stop at the first: {broken} "
                            "is not a readable image") and "options {skip_unreadable: true}" in e for e in errors), errors
    assert launch_button(at).disabled
    at.session_state["stages-(my images: one stage)"] = {
        "edited_rows": {0: {"options": '{"skip_unreadable": true}'}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.error, [e.value for e in at.error]
    launch_button(at).click().run()
    assert launched[0]["stages"][0]["options"] == {"skip_unreadable": True}


def test_an_unreadable_image_fixed_in_place_unblocks_launch(tmp_path):
    """Overwriting the file changes no folder, which keys the report's cache: the files it refused key it too."""
    folder = make_imagefolder(tmp_path / "pets")
    broken, good = sorted((folder / "cat").glob("cat_*"))[:2]
    broken.write_bytes(b"")
    at = train_page(IMAGES)
    at.text_input(key="images_folder").set_value(str(folder)).run()
    assert launch_button(at).disabled and any("is empty (0 bytes)" in e.value for e in at.error)
    broken.write_bytes(good.read_bytes())
    at.run()
    assert not at.error, [e.value for e in at.error]
    assert not launch_button(at).disabled


@pytest.mark.parametrize("typed, message", [
    ("a\x00b", "Path 'a\\x00b' contains a NUL byte."),
    ("~nosuchuser/x", "Path '~nosuchuser/x' starts with a ~ that names no user's home folder here."),
])
def test_a_folder_path_that_cannot_be_one_is_one_sentence_and_the_page_stays(typed, message):
    at = train_page(IMAGES)
    at.text_input(key="images_folder").set_value(typed).run()
    assert message in [e.value for e in at.error] and not at.exception
    assert launch_button(at).disabled


def _pets_zip(tmp_path: Path) -> bytes:
    folder = make_imagefolder(tmp_path / "src")
    return zip_folder(folder, tmp_path / "pets.zip", "pets/").read_bytes()


def test_a_zip_is_unpacked_once_reported_and_launched(tmp_path, launched):
    at = train_page(IMAGES)
    at.segmented_control(key="images_from").set_value("a .zip of class folders").run()
    at.file_uploader(key="images_zip").set_value(("pets.zip", _pets_zip(tmp_path), "application/zip")).run()
    assert not at.error and not at.exception, [e.value for e in at.error]
    target = paths.uploads_dir() / "pets" / "pets"
    assert any(f"Unpacked 12 images from pets.zip into {target}" in s.value for s in at.success)
    assert any(w.startswith("Skipped 9 files: pets/cat/.DS_Store (hidden), pets/cat/.hidden_cat.jpg (hidden), "
                                          "pets/cat/notes.txt (not an image)") for w in warnings(at)), warnings(at)
    assert "classes: 3" in at.code[0].value
    at.run()  # a rerun keeps the first unpacking: no pets-2
    assert sorted(p.name for p in paths.uploads_dir().iterdir()) == ["pets"]
    launch_button(at).click().run()
    assert launched[0]["stages"][0]["root"] == str(target)


def test_unpacked_uploads_are_listed_and_deleted_on_the_page(tmp_path):
    at = train_page(IMAGES)
    at.segmented_control(key="images_from").set_value("a .zip of class folders").run()
    at.file_uploader(key="images_zip").set_value(("pets.zip", _pets_zip(tmp_path), "application/zip")).run()
    listed = at.dataframe[-1].value
    assert list(listed["folder"]) == ["pets"] and list(listed["runs trained on it"]) == ["-"]
    at.multiselect(key="uploads_to_delete").set_value(["pets"]).run()
    at.button(key="delete_uploads").click().run()
    assert not at.exception and not (paths.uploads_dir() / "pets").exists()
    assert any(s.value.startswith("Deleted pets; freed ") for s in at.success)
    assert any("pets.zip was unpacked into is deleted: remove the file above and drop it again" in i.value
               for i in at.info)  # the upload still in the widget does not show a report of a missing folder
    assert launch_button(at).disabled


def test_a_malicious_zip_is_refused_on_the_page_and_leaves_nothing(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("cat/a.png", fx.png_bytes())
        zf.writestr("../../outside.png", fx.png_bytes())
    at = train_page(IMAGES)
    at.segmented_control(key="images_from").set_value("a .zip of class folders").run()
    at.file_uploader(key="images_zip").set_value(("evil.zip", buffer.getvalue(), "application/zip")).run()
    errors = [e.value for e in at.error]
    assert errors == ["evil.zip holds '../../outside.png', which climbs out with '..'; archives that write outside "
                      "their folder are refused."]  # and no second "root is required" for the stage waiting on it
    assert launch_button(at).disabled and not at.exception
    uploads = paths.uploads_dir()
    assert not uploads.exists() or not any(uploads.iterdir())


def test_classes_and_explain_work_on_a_run_trained_on_an_image_folder(tmp_path):
    """The run's class names are the folder names, on the Classes page (with the misclassified files and their
    Grad-CAM) and in Explain."""
    from tests.test_engine import run_tiny
    from tests.test_imagefolder import CLASSES, tiny_stage

    folder = make_imagefolder(tmp_path / "pets")
    assert run_tiny(tiny_stage(folder), name="mine") == "finished"
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    at.switch_page("pages/classes.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert {m.label: m.value for m in at.metric}["Classes"] == "3"
    assert sorted(next(d.value for d in at.dataframe if "accuracy" in d.value.columns)["class"]) == CLASSES
    toggle = next(t for t in at.toggle if t.key and t.key.startswith("cam-0-"))  # seed 0: some are wrong
    assert toggle.key.startswith(f"cam-0-{folder}")  # the gallery shows the image file itself
    toggle.set_value(True).run()
    assert not at.error and "Grad-CAM" in at.image[0].captions[0]
    at.switch_page("pages/explain.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert set(at.selectbox(key="explain_checkpoint").value.parts) >= {"mine", "best.pt"}
    predictions = [d.value for d in at.dataframe if "probability" in d.value.columns]
    assert predictions and all(set(p["class"]) <= set(CLASSES) for p in predictions)
