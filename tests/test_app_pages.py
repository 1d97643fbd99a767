"""Every page renders with an empty store, a finished run and a running one, without an exception or an
error box; and the things each page must say are there (AppTest runs the real scripts in-process)."""
from __future__ import annotations

import time
from datetime import datetime

import pytest
from streamlit.testing.v1 import AppTest

from core import paths
from core.run_store import RunStore, RunStoreError
from tests import app_fixtures as fx

pytestmark = pytest.mark.usefixtures("live_heartbeats")  # the stand-in trainer beats once (conftest.py)

PAGES = ("app.py", "pages/train.py", "pages/monitor.py", "pages/classes.py", "pages/compare.py", "pages/explain.py")


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(fx.APP, default_timeout=90).run()
    if page != "app.py":
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
    tables = {}
    for page in PAGES:
        at = open_page(page)
        assert not at.error, (page, [e.value for e in at.error])
        tables[page] = [d.proto for d in at.dataframe if d.proto.editing_mode == d.proto.EditingMode.READ_ONLY]
        assert all(t.placeholder == "–" for t in tables[page]), page  # an empty cell is a dash, not the word None
    assert tables["app.py"] and tables["pages/train.py"]  # the runs tables, whose live run has no best accuracy


def test_home_offers_the_demo_when_nothing_is_trained(monkeypatch):
    launched = []
    from train import jobs

    monkeypatch.setattr(jobs, "launch", lambda config, **kw: launched.append(config) or "demo")
    at = open_page("app.py")
    assert "Nothing has been trained yet" in texts(at)
    assert {m.label: m.value for m in at.metric}["Checkpoints"] == "0"
    at.button[0].click().run()
    assert [str(p) for p in launched] == [str(fx.REPO / "train" / "configs" / "demo.yaml")]
    assert at.title[0].value == "Monitor"  # the button took the user to the live curves


def test_home_counts_runs_and_checkpoints_and_points_to_explain():
    fx.finished_run()
    at = open_page("app.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Runs"] == "1" and metrics["Checkpoints"] == "1"
    assert "Explain an image" in [b.label for b in at.button]
    assert "demo-done" in at.dataframe[0].value["run"].tolist()


def test_train_shows_a_config_error_next_to_its_row_and_column_and_blocks_launch():
    at = open_page("pages/train.py")
    source = at.selectbox[0]
    editor_key = f"stages-{source.value}"
    at.session_state[editor_key] = {"edited_rows": {0: {"lr": -0.5}}, "added_rows": [], "deleted_rows": []}
    at.run()
    errors = [e.value for e in at.error]
    assert any(e.startswith("Row 1, column **learning rate**: stage 1") and "lr must be > 0" in e for e in errors), errors
    assert next(b for b in at.button if b.label == "Launch").disabled
    at.session_state[editor_key] = {"edited_rows": {1: {"init": "missing.pt"}}, "added_rows": [], "deleted_rows": []}
    at.run()  # a checkpoint to start from that is not there: said before Launch, under the data root like roots
    assert [e.value for e in at.error] == [f"Row 2, column **init**: checkpoint {paths.data_root() / 'missing.pt'} "
                                           "does not exist."]
    assert next(b for b in at.button if b.label == "Launch").disabled


def test_train_lists_jobs_with_failed_error_and_stop_resume_states():
    fx.failed_run()
    fx.running_run()
    at = open_page("pages/train.py")
    table = at.dataframe[-1].value
    assert set(table["run"]) == {"demo-failed", "demo-live"}
    at.selectbox(key="job_pick").set_value("demo-failed").run()
    assert "The loss became NaN at epoch 2; lower the learning rate." in [e.value for e in at.error]
    buttons = {b.label: b for b in at.button}
    assert buttons["Stop"].disabled and not buttons["Resume"].disabled
    at.selectbox(key="job_pick").set_value("demo-live").run()
    buttons = {b.label: b for b in at.button}
    assert not buttons["Stop"].disabled and buttons["Resume"].disabled


def test_a_long_error_shows_its_first_line_and_the_rest_on_demand():
    lines = [f"  File 'x_{i}.py', line {i}" for i in range(200)]
    fx.failed_run("long", error="\n".join(["RuntimeError: it broke", *lines, "Traceback (most recent call last)"]))
    at = open_page("pages/train.py")
    assert at.dataframe[-1].value["error"].tolist() == ["RuntimeError: it broke"]
    at.selectbox(key="job_pick").set_value("long").run()
    assert [e.value for e in at.error] == ["RuntimeError: it broke"]
    assert "The whole message" in [e.label for e in at.expander]
    assert any(lines[199] in c.value for c in at.code)


def test_monitor_shows_progress_eta_and_curves_of_a_live_run():
    fx.running_run()
    at = open_page("pages/monitor.py")
    stage_bar, pipeline_bar = at.get("progress")
    assert stage_bar.proto.text.startswith("Stage 1 of 1 (pretrain): epoch 2 of 4; ETA ")
    assert stage_bar.value == 25  # 1 of 4 epochs completed: a store without stage_steps
    assert pipeline_bar.proto.text == "Pipeline: step 9 of 20; ETA 42 s" and pipeline_bar.value == 45
    assert len(at.get("plotly_chart")) == 4
    RunStore().heartbeat("demo-live", step=9, stage_steps=20, images_per_s=2.44)
    at.run()
    assert at.get("progress")[0].value == 45  # step 9 of the stage's 20, not whole epochs
    assert "2.4 images/s" in texts(at)


def test_monitor_and_train_say_how_a_killed_or_stopped_run_resumes(tmp_path):
    """A run whose trainer died is no longer live: the Monitor says so (it used to drop its progress without a
    word), and both pages say whether Resume continues from a checkpoint or restarts the stage."""
    fx.running_run()
    store = RunStore()
    store.set_state("demo-live", "running", pid=2 ** 22 + 1)  # a pid no process has: the trainer is gone
    at = open_page("pages/monitor.py")
    warned = [w.value for w in at.warning if w.value.startswith("**demo-live** · interrupted")]
    assert warned and "Resume restarts stage 1 from its first epoch: no checkpoint of it was saved" in warned[0]
    last = tmp_path / "last.pt"
    last.write_bytes(b"saved")
    store.update_stage("demo-live", 0, last_path=str(last))
    store.set_state("demo-live", "stopped")
    at = open_page("pages/monitor.py")
    assert any(i.value.startswith("**demo-live** · stopped: Stopped on request. Resume continues from its last saved "
                                  "checkpoint") for i in at.info)
    at.switch_page("pages/train.py").run()
    assert any(i.value.startswith("Stopped on request. Resume continues") for i in at.info)


def test_monitor_says_when_a_live_run_is_compiling():
    from core.run_store import RunStore

    fx.running_run()
    at = open_page("pages/monitor.py")
    assert not [i for i in at.info if "torch.compile" in i.value]
    RunStore().heartbeat("demo-live", phase="compiling")
    at = open_page("pages/monitor.py")
    assert any("Compiling the model (torch.compile)" in i.value and "not a hang" in i.value for i in at.info)


def test_monitor_overlays_several_runs():
    fx.finished_run()
    fx.running_run()
    at = open_page("pages/monitor.py")
    at.multiselect[0].set_value(["demo-done", "demo-live"]).run()
    import json

    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t.get("name") for t in figure["data"] if t.get("name")}
    assert {"demo-done · train loss", "demo-live · train loss"} <= names


def test_monitor_keeps_the_runs_picked_when_the_user_comes_back_from_another_page():
    fx.finished_run()
    fx.running_run()
    at = open_page("pages/monitor.py")
    at.multiselect[0].set_value(["demo-done", "demo-live"]).run()
    at.switch_page("pages/classes.py").run()
    at.switch_page("pages/monitor.py").run()
    assert at.multiselect[0].value == ["demo-done", "demo-live"]


def test_monitor_says_which_overlaid_run_has_no_epoch_yet_and_survives_a_deleted_run():
    fx.finished_run()
    fx.running_run()
    RunStore().truncate_after("demo-live", 0, 0)  # its first epoch has not finished
    RunStore().log_steps("demo-live", 0, 1, [{"step": 1, "train_loss": 2.0, "lr": 0.05}])
    at = open_page("pages/monitor.py")
    at.multiselect[0].set_value(["demo-done", "demo-live"]).run()
    assert "demo-live: no epoch has finished yet; choose per step to see its curves." in texts(at)
    RunStore().set_state("demo-live", "stopped")
    RunStore().delete_run("demo-live")  # from another tab or the command line, while it is chosen here
    at.run()  # the picker drops it (a refreshing fragment that still holds its name leaves it out: live_view)
    assert not at.exception and at.multiselect[0].value == ["demo-done"]



def test_classes_draws_everything_from_the_store():
    fx.finished_run()
    at = open_page("pages/classes.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Classes"] == "10"
    assert metrics["Imbalance (train)"] == "12.5x"  # 100 / 8 from the fixture's long tail
    per_class = at.dataframe[0].value
    assert per_class["accuracy"].is_monotonic_increasing  # worst first
    at.text_input[0].set_value(per_class["class"].iloc[-1][:3]).run()
    assert len(at.dataframe[0].value) < len(per_class)
    assert len(at.get("plotly_chart")) == 2  # accuracy vs size, confusion matrix
    assert len(at.image) == 2  # the misclassified gallery
    assert not any("were misclassified at epoch" in c.value for c in at.caption)  # the last epoch: its own images
    assert any(c.value.startswith("Grad-CAM uses demo-done / stage2-finetune / best.pt") for c in at.caption)
    assert any(c.value.startswith("That checkpoint holds epoch 2, not the epoch-3 model that misclassified these")
               for c in at.caption)  # best.pt is from epoch 2: its map is not the misclassifying model's
    at.selectbox[2].set_value(2).run()  # the best epoch: its own images, and best.pt is its model
    assert len(at.image) == 1 and not any("were misclassified at epoch" in c.value for c in at.caption)
    assert not any(c.value.startswith("That checkpoint holds epoch") for c in at.caption)
    at.selectbox[2].set_value(1).run()  # an epoch not kept: the best epoch's images, and the page says so
    assert len(at.image) == 1
    assert any(c.value.startswith("These were misclassified at epoch 2; epoch 1's were not kept (ResLens keeps the "
                                  "misclassified images of each stage's best and last epochs") for c in at.caption)


def test_classes_gallery_shows_grad_cam_on_demand():
    fx.finished_run()
    at = open_page("pages/classes.py")
    plain = at.image[0].value
    at.toggle(key="cam-0-shapes-lt:val:0").set_value(True).run()
    assert not at.error, [e.value for e in at.error]
    assert at.image[0].value != plain and "Grad-CAM" in at.image[0].captions[0]


def test_classes_says_once_that_the_images_were_moved(tmp_path):
    from core.run_store import RunStore

    checkpoint = fx.finished_run()
    result = RunStore().class_results("demo-done", 1)
    gone = [{"source": str(tmp_path / "moved" / c / "1.png"), "true": c, "predicted": "star", "confidence": .9}
            for c in ("heart", "moon", "ring")]
    RunStore().add_evaluation(str(checkpoint), "imagefolder", "val", result, gone)
    at = open_page("pages/classes.py")
    at.segmented_control[0].set_value("an evaluation").run()
    assert not at.error and not at.image
    assert [w.value for w in at.warning] == [f"These images are no longer at {tmp_path / 'moved'}: the data set was "
                                             "moved or deleted after these results were stored (the figures above "
                                             "still hold)."]


def test_classes_shows_a_train_eval_result():
    from core.run_store import RunStore

    checkpoint = fx.finished_run()
    result = RunStore().class_results("demo-done", 1)
    RunStore().add_evaluation(str(checkpoint), "shapes-lt", "val", {**result, "image_size": 80, "flip": True},
                              [{"source": "shapes-lt:val:0", "true": "heart", "predicted": "star", "confidence": .9}])
    at = open_page("pages/classes.py")
    at.segmented_control[0].set_value("an evaluation").run()
    assert not at.error, [e.value for e in at.error]
    assert "shapes-lt val (80 px, flips) · " in at.selectbox[0].options[0]  # how it was tested
    assert {m.label: m.value for m in at.metric}["Accuracy"] == f"{result['accuracy']:.1%}"
    assert [c for c in at.image[0].captions] == ["heart → star (90%)"]


def test_classes_keeps_the_chosen_run_and_evaluation_across_the_other_view():
    """The run picker is not drawn while an evaluation is shown: Streamlit forgot it and showed the default run."""
    from core.run_store import RunStore

    fx.finished_run()
    checkpoint = fx.finished_run("other")
    result = RunStore().class_results("demo-done", 1)
    for split in ("val", "train"):
        RunStore().add_evaluation(str(checkpoint), "shapes-lt", split, result, [])
    at = open_page("pages/classes.py")
    at.selectbox(key="classes_run").set_value("other").run()
    at.segmented_control[0].set_value("an evaluation").run()
    at.selectbox[0].set_value(at.selectbox[0].options[1]).run()  # the older one: the val evaluation
    at.segmented_control[0].set_value("a training run").run()
    assert at.selectbox(key="classes_run").value == "other"
    at.segmented_control[0].set_value("an evaluation").run()
    assert at.selectbox[0].index == 1 and at.subheader[-1].value == "Misclassified validation images"
    at.selectbox[0].set_value(at.selectbox[0].options[0]).run()  # `eval --split train`: said so, not "validation"
    assert at.subheader[-1].value == "Misclassified training images"
    assert "Imbalance (evaluated)" in [m.label for m in at.metric]


def test_classes_grad_cam_falls_back_to_last_pt_or_says_the_model_is_gone():
    checkpoint = fx.finished_run()
    last = checkpoint.with_name("last.pt")
    last.write_bytes(checkpoint.read_bytes())
    from core.run_store import RunStore

    RunStore().update_stage("demo-done", 1, last_path=str(last))
    checkpoint.unlink()
    at = open_page("pages/classes.py")
    assert any(c.value.startswith("Grad-CAM uses demo-done / stage2-finetune / last.pt") for c in at.caption)
    last.unlink()
    at.run()
    assert f"Grad-CAM needs the model, and {checkpoint} is no longer there (deleted, or moved with its run folder)." \
        in [c.value for c in at.caption]
    assert not [t for t in at.toggle if t.label == "Grad-CAM"] and not at.exception


def test_classes_says_why_a_stopped_stage_has_no_results_and_shows_an_evaluations_warning():
    from core.run_store import RunStore

    store = RunStore()
    store.create_run("early", {"name": "early", "stages": [{"dataset": "shapes"}]})
    store.upsert_stage("early", 0, "pretrain", "shapes", epochs=3, class_names=fx.shapes_classes())
    store.set_state("early", "stopped")
    at = open_page("pages/classes.py")
    assert [i.value for i in at.info] == [
        "No per-class results for this stage: the run ended (stopped) before the stage's first epoch did."]
    checkpoint = fx.finished_run()
    result = {**store.class_results("demo-done", 1), "note": "The images of shapes-lt changed since ..."}
    store.add_evaluation(str(checkpoint), "shapes-lt", "val", result, [])
    at.segmented_control[0].set_value("an evaluation").run()
    assert [w.value for w in at.warning] == ["The images of shapes-lt changed since ..."]


def test_train_downloads_a_missing_data_set_with_progress(monkeypatch):
    """The download button runs core.datasets.download (here a stand-in that writes the folder and reports
    progress) and the warning is gone afterwards."""
    import core.datasets
    from core import paths

    seen = []

    def fake_download(name, root, progress=None):
        for done in (0, 50, 100):
            progress(done * 1_000_000, 100_000_000)
        seen.append((name, str(root)))
        folder = core.datasets.dataset_path(name, root)
        folder.mkdir(parents=True)
        return folder

    monkeypatch.setattr(core.datasets, "download", fake_download)
    at = open_page("pages/train.py")
    at.selectbox[0].set_value("caltech101.yaml").run()
    assert any("Caltech-101" in w.value for w in at.warning)
    next(b for b in at.button if b.label == "Download Caltech-101").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert seen == [("caltech101", str(paths.data_root()))]
    assert not any("Caltech-101" in w.value for w in at.warning)


def test_train_launches_the_edited_pipeline(monkeypatch):
    """Launch hands train.jobs.launch the pipeline as edited (types the validator accepts), then lists it."""
    from train import jobs
    from train.config import parse_config

    launched = []
    monkeypatch.setattr(jobs, "launch", lambda config, **kw: launched.append((config, kw)) or "my-pipeline")
    at = open_page("pages/train.py")
    at.selectbox[0].set_value("(empty pipeline)").run()
    at.session_state["stages-(empty pipeline)"] = {
        "edited_rows": {0: {"epochs": 2, "image_size": 32}},
        "added_rows": [{"name": "finetune", "dataset": "shapes-lt", "epochs": 1, "init": "previous",
                        "imbalance": "class_balanced"}],
        "deleted_rows": []}
    at.run()
    assert not at.error, [e.value for e in at.error]
    next(b for b in at.button if b.label == "Launch").click().run()
    (config, kwargs), = launched
    assert kwargs == {"device": None}
    pipeline = parse_config(config)
    assert [(s.dataset, s.epochs, s.init, s.imbalance) for s in pipeline.stages] == [
        ("shapes", 2, "scratch", "none"), ("shapes-lt", 1, "previous", "class_balanced")]
    assert pipeline.stages[0].image_size == 32 and isinstance(config["stages"][0]["epochs"], int)
    assert any("my-pipeline" in s.value for s in at.success)
    at.session_state["last_launch"] = (at.session_state["last_launch"][0], time.monotonic(), "my-pipeline")  # just now
    next(b for b in at.button if b.label == "Launch").click().run()  # a double click: no second run
    assert len(launched) == 1
    assert any(i.value.startswith("Run **my-pipeline** was launched from this page a moment ago; this click did not "
                                  "start a second one") for i in at.info)
    at.session_state["last_launch"] = (at.session_state["last_launch"][0], 0.0, "my-pipeline")  # long ago
    next(b for b in at.button if b.label == "Launch").click().run()  # later: a deliberate second run
    assert len(launched) == 2


def test_a_launch_that_failed_is_not_a_double_click(monkeypatch):
    from train import jobs

    calls = []

    def launch(config, **kw):
        calls.append(config)
        if len(calls) == 1:
            raise RunStoreError("Cannot create the folder of run 'demo' (denied); nothing was started.")
        return "demo"

    monkeypatch.setattr(jobs, "launch", launch)
    at = open_page("pages/train.py")
    next(b for b in at.button if b.label == "Launch").click().run()
    assert any("nothing was started" in e.value for e in at.error)
    next(b for b in at.button if b.label == "Launch").click().run()  # at once: a retry, not a double click
    assert len(calls) == 2 and any("Run **demo** started" in s.value for s in at.success)


def test_monitor_shows_step_curves_before_the_first_epoch_ends():
    from core.run_store import RunStore

    store = RunStore()
    store.create_run("fresh", {"name": "fresh", "stages": [{"name": "pre", "dataset": "shapes"},
                                                          {"name": "fine", "dataset": "shapes-lt"}]})
    store.upsert_stage("fresh", 0, "pre", "shapes", epochs=2)
    store.set_state("fresh", "running", pid=__import__("os").getpid())
    store.log_steps("fresh", 0, 1, [{"step": s, "train_loss": 2.0, "lr": 0.1} for s in range(1, 4)])
    store.heartbeat("fresh", stage=0, epoch=1, step=3, done_steps=3, total_steps=40)
    at = open_page("pages/monitor.py")
    assert "No epoch has finished yet: these are the per-step curves." in [c.value for c in at.caption]
    assert len(at.get("plotly_chart")) == 2
    assert at.get("progress")[0].proto.text.startswith("Stage 1 of 2 (pre): epoch 1 of 2")


def test_checkpoints_newest_run_first_and_best_before_last():
    import os

    from core import paths
    from pages import common

    def touch(run, name):  # listing never opens a file: placeholders will do
        path = paths.run_dir(run) / "stage1-a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return path

    old = touch("old", "best.pt")
    os.utime(old, (1, 1))
    last, best = touch("new", "last.pt"), touch("new", "best.pt")
    os.utime(best, (2, 2))  # older than last.pt, still listed first in its folder
    assert common.find_checkpoints() == [best, last, old]
    stopped = touch("stopped", "last.pt")  # the newest, but stopped before its first epoch ended: not first
    assert common.find_checkpoints() == [best, last, old, stopped]
    day = datetime.fromtimestamp(2).strftime("%Y-%m-%d")  # 1970-01-01, or 1969-12-31 west of Greenwich
    assert common.checkpoint_label(best).startswith(f"new / stage1-a / best.pt · {day}")


def test_classes_shows_no_gap_arrow_when_balanced_and_overall_accuracy_agree():
    from tests import compare_fixtures as cf

    cf.scratch_run()  # every class has 10 validation images: balanced accuracy is the accuracy
    at = open_page("pages/classes.py")
    balanced = next(m for m in at.metric if m.label == "Balanced accuracy")
    assert balanced.value == next(m for m in at.metric if m.label == "Accuracy").value and not balanced.delta
