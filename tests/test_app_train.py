"""The Train page's pipeline editor (issue 12): typed values kept exactly or refused with row, column and
reason; rows numbered from 1; pipelines opened and saved as YAML; hidden columns findable; speed switches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests import app_fixtures as fx
from tests.test_app_pages import open_page

EDITOR = "stages-demo.yaml"

pytestmark = pytest.mark.usefixtures("live_heartbeats")  # the stand-in trainer beats once (conftest.py)


def edit(at, edited=None, added=None):
    at.session_state[EDITOR] = {"edited_rows": edited or {}, "added_rows": added or [], "deleted_rows": []}
    return at.run()


def plotly_array(value) -> list:
    """A data array of a plotly JSON spec (plain list, or plotly's base64 typed array)."""
    if isinstance(value, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)


def launch_disabled(at) -> bool:
    return next(b for b in at.button if b.label == "Launch").disabled


def shown_yaml(at) -> dict:
    return yaml.safe_load(next(c.value for c in at.code if "stages:" in c.value))


def test_the_table_cannot_change_a_typed_value_and_numbers_rows_from_1():
    at = open_page("pages/train.py")
    table = at.dataframe[0]
    columns = json.loads(table.proto.columns)
    for key in ("epochs", "batch_size", "image_size", "lr"):
        assert columns[key]["type_config"] == {"type": "text"}, key  # no rounding, clamping or step
    assert not any(k in c for c in columns.values() for k in ("required", "min_value", "max_value", "step"))
    assert list(table.value.index) == [1, 2]


@pytest.mark.parametrize("cell, typed, column, reason", [
    ("epochs", "2.5", "epochs", "epochs must be an integer, got 2.5."),
    ("epochs", "0", "epochs", "epochs must be >= 1, got 0."),
    ("image_size", "5000", "image size", "image_size must be <= 1024, got 5000."),
    ("batch_size", "100000", "batch size", "batch_size must be <= 8192, got 100000."),
    ("lr", "fast", "learning rate", "lr must be a number, got 'fast'."),
])
def test_a_value_that_cannot_run_is_refused_with_row_column_and_reason(cell, typed, column, reason):
    at = edit(open_page("pages/train.py"), edited={1: {cell: typed}})
    assert [e.value for e in at.error] == [f"Row 2, column **{column}**: stage 2 (finetune): {reason}"]
    assert launch_disabled(at) and not at.success


def test_a_new_row_without_a_data_set_is_refused_not_dropped():
    at = edit(open_page("pages/train.py"), added=[{"name": "extra"}])
    assert [e.value for e in at.error] == [
        "Row 3, column **data set**: stage 3 (extra): the row has no data set; choose a data set or delete the row."]
    assert launch_disabled(at) and not any("is valid" in s.value for s in at.success)


def test_typed_values_are_kept_exactly():
    at = edit(open_page("pages/train.py"), edited={0: {"lr": "5e-4", "epochs": "3"}, 1: {"warmup_epochs": "0.25"}})
    assert not at.error
    stages = shown_yaml(at)["stages"]
    assert (stages[0]["lr"], stages[0]["epochs"], stages[1]["warmup_epochs"]) == (0.0005, 3, 0.25)
    assert "The pipeline is valid: 2 stage(s)." in [s.value for s in at.success]


def test_hidden_columns_are_findable():
    at = open_page("pages/train.py")
    assert any("hidden columns" in c.value for c in at.caption)
    assert "optimizer" not in at.dataframe[0].proto.column_order
    at.toggle(key="all_columns").set_value(True).run()
    shown = list(at.dataframe[0].proto.column_order)
    assert {"optimizer", "schedule", "augment", "freeze_epochs", "root"} <= set(shown)


def test_showing_every_column_keeps_the_edits_made_before():
    """The toggle gives the table other columns, which Streamlit takes for a new table: the edits were dropped."""
    at = open_page("pages/train.py")
    edit(at, edited={0: {"epochs": 1, "batch_size": 8}})
    at.run()
    assert (shown_yaml(at)["stages"][0]["epochs"], shown_yaml(at)["stages"][0]["batch_size"]) == (1, 8)
    at.toggle(key="all_columns").set_value(True).run()
    assert (shown_yaml(at)["stages"][0]["epochs"], shown_yaml(at)["stages"][0]["batch_size"]) == (1, 8)
    at.toggle(key="all_columns").set_value(False).run()
    assert (shown_yaml(at)["stages"][0]["epochs"], shown_yaml(at)["stages"][0]["batch_size"]) == (1, 8)


def test_another_pipeline_and_back_keeps_the_edits():
    """Streamlit forgets a widget that one run does not draw: the first pipeline's settings and rows were reset."""
    at = open_page("pages/train.py")
    edit(at, edited={0: {"epochs": 1}})
    at.text_input(key="name-demo.yaml").set_value("mine").run()
    at.selectbox(key="compile-demo.yaml").set_value(True).run()
    at.selectbox(key="pipeline_source").set_value("caltech101.yaml").run()
    assert shown_yaml(at)["name"] != "mine"
    at.selectbox(key="pipeline_source").set_value("demo.yaml").run()
    config = shown_yaml(at)
    assert (config["name"], config["compile"], config["stages"][0]["epochs"]) == ("mine", True, 1)
    at.toggle(key="all_columns").set_value(True).run()  # and the table's own keeping still holds
    assert shown_yaml(at)["stages"][0]["epochs"] == 1
    at.text_input(key="name-demo.yaml").set_value("mine-2").run()
    at.switch_page("pages/monitor.py").run()  # another page, and back: the latest edits, not the older ones
    at.switch_page("pages/train.py").run()
    config = shown_yaml(at)
    assert (config["name"], config["compile"], config["stages"][0]["epochs"]) == ("mine-2", True, 1)
    at.button(key="undo-edits").click().run()
    config, shipped = shown_yaml(at), yaml.safe_load(Path("train/configs/demo.yaml").read_text())
    assert (config["name"], config["compile"], config["stages"][0]["epochs"]) == (
        shipped["name"], shipped.get("compile", "auto"), shipped["stages"][0]["epochs"])


def test_an_init_checkpoint_that_is_a_folder_is_said_at_its_cell(tmp_path):
    at = edit(open_page("pages/train.py"), edited={1: {"init": str(tmp_path)}})
    assert f"Row 2, column **init**: checkpoint {tmp_path} is a folder." in [e.value for e in at.error]
    assert launch_disabled(at)


def test_speed_switches_go_into_the_pipeline():
    at = open_page("pages/train.py")
    assert shown_yaml(at)["compile"] == "auto"
    at.selectbox(key="compile-demo.yaml").set_value(True).run()
    at.toggle(key="amp-demo.yaml").set_value(False).run()
    config = shown_yaml(at)
    assert (config["compile"], config["amp"], config["channels_last"]) == (True, False, True)
    at.selectbox(key="compile-demo.yaml").set_value(False).run()
    assert shown_yaml(at)["compile"] is False
    assert shown_yaml(at)["data_path"] == "auto"
    at.selectbox(key="data_path-demo.yaml").set_value("device").run()
    assert shown_yaml(at)["data_path"] == "device"


def test_a_pipeline_file_opens_and_saves_back():
    raw = {"name": "mine", "arch": "resnet18", "seed": 3,
           "stages": [{"name": "only", "dataset": "shapes", "epochs": 2, "lr": 0.0005}]}
    at = open_page("pages/train.py")
    at.selectbox(key="pipeline_source").set_value("(the file opened below)").run()
    at.file_uploader(key="pipeline_file").set_value(("mine.yaml", yaml.safe_dump(raw).encode(), "application/yaml"))
    at.run()
    assert not at.error, [e.value for e in at.error]
    config = shown_yaml(at)
    assert (config["name"], config["arch"], config["seed"]) == ("mine", "resnet18", 3)
    assert [(s["name"], s["epochs"], s["lr"]) for s in config["stages"]] == [("only", 2, 0.0005)]
    assert [b.label for b in at.get("download_button")] == ["Save as YAML"]


@pytest.mark.parametrize("text, message", [
    (b"just: text\n", "x.yaml is not a pipeline: it needs a 'stages' list."),
    (b"stages:\n  - {dataset: shapes, bogus: 1}\n", "x.yaml: stage 1: unknown key 'bogus'; allowed keys are "),
    (b"stages:\n  - {dataset: shapes, name: a}\n  - 7\n", "x.yaml: stage 2: each stage must be a mapping of keys, "
                                                         "got int."),
    (b"stages:\n  - {dataset: shapes, epochs: " + b"9" * 5000 + b"}\n", "x.yaml was refused: a value cannot be read"),
])
def test_a_file_that_is_not_a_pipeline_is_one_sentence_not_a_smaller_pipeline(text, message):
    at = open_page("pages/train.py")
    at.selectbox(key="pipeline_source").set_value("(the file opened below)").run()
    at.file_uploader(key="pipeline_file").set_value(("x.yaml", text, "application/yaml")).run()
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(message) and not at.exception, errors


@pytest.mark.parametrize("line, reason", [
    ("seed: 42.0", "seed must be an integer, got 42.0."),
    ("amp: 'false'", "amp must be true or false, got 'false'."),
    ("compile: [true]", "compile must be auto, true or false, got [True]."),
    ("retention: {}", "retention must be one of all, final, got {}."),
])
def test_an_opened_pipeline_with_a_bad_setting_is_refused_not_changed(line, reason):
    at = open_page("pages/train.py")
    at.selectbox(key="pipeline_source").set_value("(the file opened below)").run()
    text = f"name: odd\n{line}\nstages:\n  - {{name: one, dataset: shapes}}\n".encode()
    at.file_uploader(key="pipeline_file").set_value(("odd.yaml", text, "application/yaml")).run()
    assert [e.value for e in at.error] == [f"odd.yaml: the config: {reason}"]
    assert not at.exception


def test_an_opened_pipeline_whose_name_cannot_be_a_run_name_opens_and_the_name_is_fixed_here():
    at = open_page("pages/train.py")
    at.selectbox(key="pipeline_source").set_value("(the file opened below)").run()
    text = "name: été run\nstages:\n  - {name: one, dataset: shapes, epochs: 1}\n".encode()
    at.file_uploader(key="pipeline_file").set_value(("ete.yaml", text, "application/yaml")).run()
    name_box = next(t for t in at.text_input if t.label == "Run name")
    assert name_box.value == "été run"
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Run name 'été run' is not allowed" in errors[0]  # said, and editable right here
    name_box.set_value("ete-run").run()
    assert not at.error and not at.exception, [e.value for e in at.error]


def test_classes_says_why_a_failed_run_has_no_results():
    fx.failed_run()
    at = open_page("pages/classes.py")
    at.selectbox(key="classes_run").set_value("demo-failed").run()
    assert [e.value for e in at.error] == [
        "Run demo-failed failed before its first stage: The loss became NaN at epoch 2; lower the learning rate."]


def test_monitor_says_estimating_and_shows_the_gpu_only_when_there_is_one():
    from core.run_store import RunStore

    fx.running_run()
    at = open_page("pages/monitor.py")
    assert not any("GPU" in c.value for c in at.caption)
    RunStore().heartbeat("demo-live", eta_s=None, stage_eta_s=None, gpu=[
        {"index": 0, "name": "Test GPU", "memory_used": 10 * 2**30, "memory_total": 16 * 2**30, "utilization": 87}])
    at = open_page("pages/monitor.py")
    stage_bar, pipeline_bar = at.get("progress")
    assert stage_bar.proto.text.endswith("ETA estimating...") and pipeline_bar.proto.text.endswith("ETA estimating...")
    assert "GPU 0 (Test GPU): memory 10.0 of 16 GiB · utilisation 87%" in [c.value for c in at.caption]


def test_monitor_draws_the_learning_rate_of_a_one_epoch_run_per_step():
    from core.run_store import RunStore

    store = RunStore()
    store.create_run("short", {"name": "short", "stages": [{"dataset": "shapes"}]})
    store.upsert_stage("short", 0, "only", "shapes", epochs=1)
    store.log_steps("short", 0, 1, [{"step": s, "train_loss": 1.0, "lr": 0.1 * (1 - s / 5)} for s in range(1, 6)])
    store.log_epoch("short", 0, 1, step=5, train_loss=1.0, val_acc=0.5, lr=0.0)
    store.set_state("short", "finished")
    at = open_page("pages/monitor.py")
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    lr = next(f for f in figures if f["layout"]["title"]["text"].startswith("Learning rate"))
    ys = [y for trace in lr["data"] for y in plotly_array(trace["y"])]
    assert len(ys) == 5 and max(ys) == pytest.approx(0.08)  # every step, not only the final 0


def test_classes_shows_precision_f1_top5_and_counts_on_demand():
    from core.evaluation import class_result
    from core.run_store import RunStore

    fx.finished_run()
    stored = RunStore().class_results("demo-done", 1)
    RunStore().save_class_results("demo-done", 1, 3, class_result(stored["classes"], stored["confusion"],
                                                                  stored["train_counts"], top5_acc=0.97))
    at = open_page("pages/classes.py")
    assert {m.label: m.value for m in at.metric}["Top-5 accuracy"] == "97.0%"
    assert {"precision", "F1"} <= set(at.dataframe[0].value.columns)
    matrix = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"][0]
    assert matrix["colorbar"]["title"]["text"] == "share" and matrix["texttemplate"] == "%{text}"
    at.toggle(key="confusion_normalised").set_value(False).run()
    matrix = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"][0]
    assert matrix["colorbar"]["title"]["text"] == "count"


def test_runs_table_has_date_duration_data_sets_and_the_config_one_click_away():
    fx.finished_run()
    at = open_page("pages/train.py")
    table = at.dataframe[-1].value
    assert {"started", "duration", "data sets", "device", "best val accuracy"} <= set(table.columns)
    assert table["data sets"].tolist() == ["shapes → shapes-lt"]
    assert any(e.label == "Config of this run" for e in at.expander)
    assert any("prints to its terminal" in c.value for c in at.code)  # no log.txt: this run was not launched here


def test_checkpoint_labels_say_stage_epoch_accuracy_and_date():
    from core.run_store import RunStore
    from pages import common

    best = fx.finished_run()
    RunStore().update_stage("demo-done", 1, best_epoch=2, best_val_acc=0.65)
    label = common.checkpoint_label(best)
    assert label.startswith("demo-done / stage2-finetune / best.pt · epoch 2 · 65.0% · 20"), label


def test_delete_asks_then_frees_the_space():
    from core import paths
    from core.run_store import RunStore

    fx.finished_run()
    at = open_page("pages/train.py")
    assert any("Delete **demo-done** for good" in m.value for m in at.markdown)
    at.button(key="delete-demo-done").click().run()
    assert not RunStore().has_run("demo-done") and not paths.run_dir("demo-done").exists()
    assert any(s.value.startswith("Deleted run demo-done; freed ") for s in at.success)


def test_the_jobs_stay_while_a_pipeline_file_is_still_to_be_chosen():
    fx.finished_run()
    at = open_page("pages/train.py")
    at.selectbox(key="pipeline_source").set_value("(the file opened below)").run()
    assert "Choose a pipeline YAML file to edit it here." in [i.value for i in at.info]
    assert "Jobs" in [h.value for h in at.header] and at.selectbox(key="job_pick").value == "demo-done"
    assert not any(b.label == "Launch" for b in at.button) and not at.exception


def test_after_launch_the_job_list_shows_the_new_run_not_the_one_picked_before(monkeypatch):
    """The picker kept its own value: Stop under "Run web-2 started" would have stopped another run."""
    from train import jobs

    fx.finished_run("older")
    fx.finished_run()
    monkeypatch.setattr(jobs, "launch", lambda config, **kw: fx.failed_run("fresh") or "fresh")
    at = open_page("pages/train.py")
    at.selectbox(key="job_pick").set_value("older").run()
    next(b for b in at.button if b.label == "Launch").click().run()
    assert "Run **fresh** started in its own process; closing this tab does not stop it." in [s.value for s in at.success]
    assert at.selectbox(key="job_pick").value == "fresh" and not at.exception


def test_a_live_run_cannot_be_deleted():
    from core.run_store import RunStoreError
    from train import jobs

    fx.running_run()
    with pytest.raises(RunStoreError, match="still running; stop it before deleting it"):
        jobs.delete("demo-live")


def test_patience_and_retention_reach_the_pipeline():
    at = edit(open_page("pages/train.py"), edited={1: {"patience": "3"}})
    assert "patience" in at.dataframe[0].proto.column_order
    at.selectbox(key="retention-demo.yaml").set_value("final").run()
    config = shown_yaml(at)
    assert config["stages"][1]["patience"] == 3 and config["retention"] == "final"


def test_learning_rate_button_runs_the_range_test_and_plots_it(monkeypatch):
    from train import lr_find

    asked = []

    def fake(config, stage, steps, **kwargs):
        asked.append((config.stages[stage].name, steps))
        return lr_find.LRFindResult([1e-5, 1e-3, 1e-1], [2.0, 1.2, 5.0], 1e-3)

    monkeypatch.setattr(lr_find, "lr_range_test", fake)
    at = open_page("pages/train.py")
    at.selectbox(key="lr_find_stage").set_value(1).run()
    next(b for b in at.button if b.label == "Find a learning rate").click().run()
    assert asked == [("finetune", 100)]
    assert "Suggested learning rate for stage 2: **1.00e-03** (type it into the learning rate column)." in [
        s.value for s in at.success]
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["xaxis"]["type"] == "log"
    at.selectbox[0].set_value("(empty pipeline)").run()  # another pipeline: the old result is not shown under it
    assert not any("Suggested learning rate" in s.value for s in at.success) and not at.get("plotly_chart")


def test_every_setting_value_has_a_label_on_the_page():
    import ast

    from train.config import DATA_PATHS, RETENTION

    tree = ast.parse((Path(__file__).resolve().parents[1] / "pages" / "train.py").read_text())
    labels = {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body
              if isinstance(t, ast.Assign) and getattr(t.targets[0], "id", "").endswith("_LABELS")}
    assert list(labels["DATA_PATH_LABELS"]) == list(DATA_PATHS) and list(labels["RETENTION_LABELS"]) == list(RETENTION)


def test_the_image_cache_is_listed_and_cleared(tmp_path):
    from tests.data_fixtures import make_caltech101
    from tests.test_engine import TINY_SIZES
    from train.image_cache import augmentation, cache_entries, open_cached_split

    root = make_caltech101(tmp_path, TINY_SIZES)
    cached, _ = open_cached_split("caltech101", str(root), "val", {}, 37, augmentation("none", 32))
    at = open_page("pages/train.py")
    assert any(e.label.startswith("Image cache on disk: 1 cached splits, ") for e in at.expander)
    holds = at.dataframe[-1].value["holds"].tolist()
    assert holds == [f"caltech101 (val), {len(cached)} images cached at 37 px, root {root}"]
    at.button(key="clear-cache").click().run()
    assert cache_entries() == [] and not cached.path.exists()
    assert any(s.value.startswith("Cleared the image cache; freed ") for s in at.success)
    assert any(e.label == "Image cache on disk: 0 cached splits, 0 bytes" for e in at.expander)
