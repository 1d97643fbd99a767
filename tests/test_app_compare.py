"""The Compare page (AppTest runs the real script): empty store, two runs, three runs, a chosen stage."""
from __future__ import annotations

import base64
import json

import numpy as np

from core.run_store import RunStore
from tests import compare_fixtures as cf
from tests.test_app_pages import open_page, texts

PAGE = "pages/compare.py"


def values(array) -> list:
    """A plotly data array as a list, whether plain or typed ({'dtype': 'f8', 'bdata': base64})."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def two_runs() -> None:
    store = RunStore()
    cf.scratch_run(store)
    cf.staged_run(store)


def test_compare_with_no_runs_or_one_run_says_two_are_needed():
    at = open_page(PAGE)
    assert "Comparing needs at least two runs; there are none yet." in texts(at)
    cf.scratch_run()
    at = open_page(PAGE)
    assert "there is one so far" in texts(at) and not at.error


def test_compare_is_in_the_sidebar():
    at = open_page("app.py")
    assert ("Compare", "compare") in [(link.proto.label, link.proto.page) for link in at.get("page_link")]


def test_compare_shows_differences_stage_results_per_class_and_curves():
    two_runs()
    at = open_page(PAGE)
    assert not at.error, [e.value for e in at.error]
    assert at.multiselect[0].value == ["scratch", "staged"]  # the two newest; the older one is the baseline
    config, stages, gains, losses = (d.value for d in at.dataframe)
    assert "stages.1.dataset" in config.index and "stages.1.batch_size" not in config.index  # only differences
    assert config.loc["stages.2.lr"].tolist()[:2] == ["", "0.01"]
    assert stages[["run", "stage", "name"]].values.tolist() == [["scratch", 1, "caltech"], ["staged", 1, "pretrain"],
                                                                ["staged", 2, "finetune"]]
    assert gains["class"].tolist() == ["dog", "cat", "bee"] and losses["class"].tolist() == ["eel"]
    assert gains["change"].tolist()[0] == 40.0  # shown in points
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) == 4  # the scatter, then accuracy, balanced accuracy and loss curves
    scatter = charts[0]["data"][0]
    assert values(scatter["text"]) == cf.CLASSES and values(scatter["x"]) == [0.9, 0.8, 0.5, 0.2, 0.6]
    assert values(scatter["y"]) == [0.9, 1.0, 0.8, 0.6, 0.3]
    assert {trace["name"].split(" · ")[0] for trace in charts[1]["data"]} == {"scratch", "staged"}
    assert [shape["x0"] for shape in charts[1]["layout"]["shapes"]] == [1.5]  # staged's second stage starts at epoch 2

    at.toggle[0].set_value(False).run()  # every key, differences highlighted
    assert "stages.1.batch_size" in at.dataframe[0].value.index


def test_a_chosen_stage_without_shared_classes_is_a_sentence_and_more_runs_pick_the_other():
    two_runs()
    cf.other_run()
    at = open_page(PAGE)
    at.multiselect[0].set_value(["scratch", "staged", "other"]).run()
    pick = next(s for s in at.selectbox if s.label.startswith("Run set against"))
    pick.set_value("other").run()
    assert "share no class names" in texts(at)
    assert not at.error
    stage = next(s for s in at.selectbox if s.label.startswith("Stage for"))
    stage.set_value(1).run()
    pick = next(s for s in at.selectbox if s.label.startswith("Run set against"))
    pick.set_value("staged").run()
    assert "stage 1 of scratch (caltech101) and stage 1 of staged (tinyimagenet) share no class names" in texts(at)


def test_runs_named_like_table_columns_and_a_single_shared_class_are_compared():
    store = RunStore()
    cf.scratch_run(store, name="class")
    cf.staged_run(store, name="change")
    at = open_page(PAGE)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    gains = at.dataframe[2].value
    assert gains["class"].tolist() == ["dog", "cat", "bee"]
    cf.write_run(store, "one", [cf.stage_config("caltech", "caltech101")],
                 [[cf.result_with([cf.CLASSES[0], "q"], [5, 7], [8, 8])]])
    at.multiselect[0].set_value(["class", "one"]).run()
    assert not at.exception and not at.slider  # one class in common: listed without a slider
    assert "1 class: 0 better, 1 worse, 0 the same." in texts(at)  # ant fell from 90% to 50%
