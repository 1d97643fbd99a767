"""core/compare.py: configs side by side, per-stage results, per-class changes of one run against another."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from core.compare import (ClassChange, ClassComparison, CompareError, class_comparison, compare_classes, compare_runs,
                          config_rows, flatten_config, stage_results)
from core.run_store import RunNotFound, RunStore
from tests import compare_fixtures as cf


@pytest.fixture
def store() -> RunStore:
    return cf.all_runs()


def test_flatten_numbers_stages_from_one_and_joins_nested_keys():
    flat = flatten_config({"arch": "resnet50", "stages": [{"dataset": "a", "options": {"root": "x", "n": 2}},
                                                          {"dataset": "b", "options": {}}]})
    assert flat == {"arch": "resnet50", "stages.1.dataset": "a", "stages.1.options.root": "x",
                    "stages.1.options.n": 2, "stages.2.dataset": "b", "stages.2.options": {}}


def test_config_rows_flag_only_the_differences():
    rows = {r.key: r for r in config_rows({
        "a": {"arch": "resnet50", "seed": 0, "amp": True, "stages": [{"lr": 0.1, "epochs": 2, "root": None}]},
        "b": {"arch": "resnet18", "seed": 0.0, "amp": 1, "stages": [{"lr": 0.1, "epochs": 3}, {"lr": 0.01}]},
    })}
    assert rows["arch"].differs and rows["arch"].values == {"a": "resnet50", "b": "resnet18"}
    assert rows["stages.1.epochs"].differs
    assert not rows["seed"].differs  # 0 and 0.0 are the same seed
    assert not rows["stages.1.lr"].differs
    assert rows["amp"].differs  # true is not the number 1
    # b lacks root: the default, as a's null is (a difference here read "(none)" against "(none)")
    assert not rows["stages.1.root"].differs and rows["stages.1.root"].values == {"a": None, "b": None}
    assert rows["stages.2.lr"].differs and rows["stages.2.lr"].values == {"a": None, "b": 0.01}
    assert list(rows)[:3] == ["arch", "seed", "amp"]  # in the order the keys first appear


def test_a_null_option_an_absent_one_and_no_options_are_the_same_config():
    rows = config_rows({"a": {"amp": False, "stages": [{"options": {}}, {"options": {"val_fraction": 0.3}}]},
                        "b": {"stages": [{"options": {"val_fraction": None}}, {"options": {"val_fraction": 0.2}}]}})
    assert [r.key for r in rows if r.differs] == ["amp", "stages.2.options.val_fraction"]  # false is no null


def test_the_root_of_a_generated_data_set_is_not_a_difference():
    rows = {r.key: r for r in config_rows({
        "here": {"stages": [{"dataset": "shapes", "root": "/home/me/data"}, {"dataset": "caltech101", "root": "/a"}]},
        "there": {"stages": [{"dataset": "shapes", "root": "/srv/data"}, {"dataset": "caltech101", "root": "/b"}]},
    })}
    assert "stages.1.root" not in rows  # shapes reads no files: its data root changes nothing
    assert rows["stages.2.root"].differs  # Caltech's files are read from there


def test_stage_results_give_final_and_best_of_every_stage(store):
    (scratch,) = stage_results(store, "scratch")
    assert (scratch.stage, scratch.name, scratch.dataset, scratch.completed_epochs) == (1, "caltech", "caltech101", 2)
    assert scratch.final_acc == pytest.approx(0.6) and scratch.best_acc == pytest.approx(0.7)
    assert scratch.best_epoch == 1
    assert scratch.final_balanced_acc == pytest.approx(0.6) and scratch.best_balanced_acc == pytest.approx(0.7)
    pretrain, finetune = stage_results(store, "staged")
    assert (pretrain.stage, pretrain.dataset, finetune.stage, finetune.name) == (1, "tinyimagenet", 2, "finetune")
    assert pretrain.final_acc == pytest.approx(18 / 30) and finetune.final_acc == pytest.approx(36 / 50)


def test_a_stage_of_the_config_that_has_not_started_has_no_results():
    store = RunStore()
    store.create_run("planned", {"stages": [{"name": "one", "dataset": "shapes", "epochs": 3}]})
    (stage,) = stage_results(store, "planned")
    assert (stage.name, stage.epochs, stage.completed_epochs, stage.final_acc, stage.best_acc) == ("one", 3, 0, None,
                                                                                                    None)


def test_last_stages_are_compared_class_by_class_with_gains_and_losses_in_order(store):
    c = compare_classes(store, "scratch", "staged")
    assert (c.stage_a, c.stage_b, c.dataset_a, c.dataset_b, c.message) == (1, 2, "caltech101", "caltech101", None)
    by_name = {x.name: x for x in c.classes}
    assert [x.name for x in c.classes] == cf.CLASSES
    assert by_name["dog"].delta == pytest.approx(0.4) and by_name["eel"].delta == pytest.approx(-0.3)
    assert by_name["dog"].train_count == 10 and by_name["dog"].val_count == 10
    assert [x.name for x in c.gains(10)] == ["dog", "cat", "bee"]  # ant did not change: neither list
    assert [x.name for x in c.gains(2)] == ["dog", "cat"]
    assert [x.name for x in c.losses(10)] == ["eel"]
    assert c.summary() == {"classes": 5, "better": 3, "worse": 1, "same": 1, "unscored": 0,
                           "mean_change": pytest.approx(0.12)}
    assert c.counts_text() == "5 classes: 3 better, 1 worse, 1 the same"


def test_a_class_without_validation_images_in_one_run_is_counted_as_not_compared():
    c = ClassComparison("a", "b", classes=[ClassChange("ant", 4, 2, 0.5, 1.0), ClassChange("bee", 1, 0, None, 0.0)])
    assert c.summary()["unscored"] == 1 and c.summary()["mean_change"] == pytest.approx(0.5)
    assert c.counts_text() == "2 classes: 1 better, 0 worse, 0 the same, 1 without validation images in one run or both"


def test_stages_without_shared_class_names_get_a_sentence(store):
    c = compare_classes(store, "scratch", "other")
    assert c.classes == [] and not c.gains(5) and not c.losses(5)
    assert c.message == ("stage 1 of scratch (caltech101) and stage 1 of other (pq) share no class names "
                         "(5 and 2 classes), so they cannot be compared class by class.")


def test_image_folders_are_named_by_their_folder_in_stage_results_and_class_headings(store):
    for name, root in (("cats", "/data/cats-v1"), ("cats2", "/data/cats-v2")):
        cf.write_run(store, name, [cf.stage_config("own", "imagefolder", root=root)],
                     [[cf.result_with(["tabby", "siamese"], [5, 6])]])
    [cats] = stage_results(store, "cats")
    assert (cats.dataset, cats.folder, cats.data_set) == ("imagefolder", "cats-v1", "imagefolder cats-v1")
    c = compare_classes(store, "cats", "cats2")
    assert (c.dataset_a, c.folder_b, c.data_a, c.data_b) == ("imagefolder", "cats-v2", "imagefolder cats-v1",
                                                             "imagefolder cats-v2")
    assert [s.data_set for s in stage_results(store, "scratch")] == ["caltech101"]  # a named set keeps its name


def test_a_chosen_stage_is_used_in_both_runs(store):
    assert compare_classes(store, "staged", "scratch", stage=2).message == "Run scratch has no stage 2: it has 1 stage."
    cf.write_run(store, "half", [cf.stage_config("pretrain", "tinyimagenet"), cf.stage_config("tune", "caltech101")],
                 [[cf.result_with(["x1", "x2"], [5, 6])]])  # its second stage never validated
    assert compare_classes(store, "staged", "half", stage=2).message == \
        "Run half has no per-class results for stage 2."
    c = compare_classes(store, "scratch", "staged", stage=1)  # caltech against tinyimagenet
    assert "share no class names" in c.message


@pytest.mark.parametrize("state, why", [
    ("failed", ": it failed before its first epoch ended."),
    ("stopped", ": it was stopped before its first epoch ended."),
    ("running", " yet: they are stored at the end of every epoch."),
])
def test_a_run_without_per_class_results_says_why_by_its_state(store, state, why):
    store.create_run("empty", {"name": "empty", "stages": [cf.stage_config("caltech", "caltech101")]})
    store.set_state("empty", state, pid=os.getpid() if state == "running" else None)
    assert compare_classes(store, "scratch", "empty").message == f"Run empty has no per-class results{why}"


def test_classes_are_matched_by_name_whatever_their_order():
    a = cf.result_with(["x", "y", "z"], [2, 4, 6], [1, 2, 3])
    b = cf.result_with(["z", "y", "x"], [6, 5, 9])
    c = class_comparison("a", a, "b", b)
    assert [(x.name, round(x.delta, 3), x.train_count) for x in c.classes] == [("x", 0.7, 1), ("y", 0.1, 2),
                                                                               ("z", 0.0, 3)]


def test_classes_only_one_stage_has_are_left_out_and_said_so():
    c = class_comparison("a", cf.result_with(["x", "y", "z"], [2, 4, 6]), "b", cf.result_with(["y", "z", "w"],
                                                                                              [5, 6, 1]))
    assert [x.name for x in c.classes] == ["y", "z"]
    assert c.message == "2 classes that only one of the two stages has were left out; 2 shared classes are compared."


def test_compare_runs_sets_every_later_run_against_the_first(store):
    comparison = compare_runs(store, ["scratch", "staged", "other", "staged"])
    assert comparison.runs == ["scratch", "staged", "other"]  # a repeated name counts once
    assert [(c.run_a, c.run_b) for c in comparison.classes] == [("scratch", "staged"), ("scratch", "other")]
    assert [s.run for s in comparison.stages] == ["scratch", "staged", "staged", "other"]
    assert {r.key for r in comparison.differences()} >= {"name", "arch", "stages.1.name", "stages.2.lr"}
    assert "stages.1.batch_size" not in {r.key for r in comparison.differences()}
    assert list(comparison.curves["staged"]["stage"]) == [0, 1]
    assert comparison.stage_names == {"scratch": ["caltech"], "staged": ["pretrain", "finetune"], "other": ["caltech"]}
    data = comparison.to_dict(top=2)
    assert data["classes"][0]["gains"] == ["dog", "cat"] and data["classes"][0]["classes"][3]["delta"] == \
        pytest.approx(0.4)


def test_compare_runs_refuses_fewer_than_two_runs_unknown_runs_and_stage_zero(store):
    with pytest.raises(CompareError, match="at least two different runs"):
        compare_runs(store, ["scratch", "scratch"])
    with pytest.raises(RunNotFound, match="no run named 'nope'"):
        compare_runs(store, ["scratch", "nope"])
    with pytest.raises(CompareError, match="numbered from 1"):
        compare_runs(store, ["scratch", "staged"], stage=0)


def _count_store_reads(monkeypatch) -> Counter:
    """Every call of a public RunStore method, counted by (method, arguments)."""
    calls: Counter = Counter()
    for name, method in vars(RunStore).items():
        if callable(method) and not name.startswith("_"):
            def counted(self, *args, __name=name, __method=method, **kwargs):
                calls[(__name, args, tuple(sorted(kwargs.items())))] += 1
                return __method(self, *args, **kwargs)
            monkeypatch.setattr(RunStore, name, counted)
    return calls


@pytest.mark.parametrize("stage", [None, 1])
def test_a_comparison_reads_each_thing_from_the_store_once(store, monkeypatch, stage):
    calls = _count_store_reads(monkeypatch)
    comparison = compare_runs(store, ["scratch", "staged"], stage=stage)
    assert comparison.classes[0].stage_b == (2 if stage is None else 1)
    repeated = {call: n for call, n in calls.items() if n > 1}
    assert not repeated
    methods = Counter(name for name, _, _ in calls)
    assert methods["get_run"] == 2 and methods["stages"] == 2 and methods["metrics_frame"] == 2
    assert methods["class_results"] == 2  # the one compared stage of each run, not every stage


def test_equal_changes_are_ties_listed_by_name_whatever_the_float_noise():
    a = cf.result_with(["a", "b", "c"], [3, 2, 1])
    b = cf.result_with(["a", "b", "c"], [4, 3, 2])  # +10 points each: 0.4-0.3, 0.3-0.2, 0.2-0.1 differ in floats
    c = class_comparison("a", a, "b", b)
    assert [x.name for x in c.gains(3)] == ["a", "b", "c"]
    assert c.summary()["better"] == 3
