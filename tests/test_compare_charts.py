"""core/charts.py, run comparison: config table with highlighted differences, per-stage table, per-class scatter
(interactive and static)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from core import charts
from core.compare import ClassChange, ClassComparison, compare_runs
from core.run_store import RunStore
from tests import compare_fixtures as cf


@pytest.fixture
def comparison():
    store = RunStore()
    cf.scratch_run(store)
    cf.staged_run(store)
    return compare_runs(store, ["scratch", "staged"])


def test_config_frame_puts_runs_side_by_side_and_can_keep_only_differences(comparison):
    full = charts.config_frame(comparison.config)
    assert list(full.columns) == ["scratch", "staged", "differs"]
    assert full.loc["stages.1.dataset"].tolist() == ["caltech101", "tinyimagenet", True]
    assert full.loc["amp"].tolist() == ["true", "true", False]
    assert full.loc["stages.2.lr", "scratch"] == ""  # a key the run lacks is an empty cell
    only = charts.config_frame(comparison.config, only_differences=True)
    assert only["differs"].all() and "stages.1.batch_size" not in only.index and "stages.2.lr" in only.index
    assert len(only) == sum(r.differs for r in comparison.config)


@pytest.mark.parametrize("value, text", [(0.1, "0.1"), (3.0, "3"), (1e-5, "1e-05"), (0.00123456789, "0.00123456789"),
                                         (0.00123456999, "0.00123456999"), (None, ""), (True, "true")])
def test_config_text_keeps_every_digit_that_tells_two_values_apart(value, text):
    assert charts.config_text(value) == text


def test_highlight_differences_shades_exactly_the_differing_rows(comparison):
    frame = charts.config_frame(comparison.config)
    html = charts.highlight_differences(frame).to_html()
    style = html[:html.index("</style>")]
    shaded = {int(row) for row in re.findall(r"_row(\d+)_col\d", style)}
    assert shaded == {i for i, differs in enumerate(frame["differs"]) if differs}
    assert ">differs<" not in html  # the flag column itself is hidden


def test_stage_results_frame_has_one_row_per_run_and_stage(comparison):
    frame = charts.stage_results_frame(comparison.stages)
    assert frame[["run", "stage", "name", "epochs"]].values.tolist() == [
        ["scratch", 1, "caltech", "2/2"], ["staged", 1, "pretrain", "1/2"], ["staged", 2, "finetune", "1/2"]]
    assert frame["best acc"].tolist() == pytest.approx([0.7, 0.6, 0.72])
    assert frame["final acc"].tolist() == pytest.approx([0.6, 0.6, 0.72])


def _comparison_with_a_missing_class() -> ClassComparison:
    return ClassComparison("a", "b", classes=[
        ClassChange("big", 400, 10, 0.5, 0.9), ClassChange("small", 4, 10, 0.8, 0.2),
        ClassChange("mid", 40, 10, 0.5, 0.5), ClassChange("empty", 7, 0, None, None)])


def test_class_scatter_plots_b_against_a_sized_by_class_size_with_a_diagonal():
    fig = charts.class_scatter_figure(_comparison_with_a_missing_class().frame(), "a", "b")
    points, diagonal = fig.data
    assert list(points.text) == ["big", "small", "mid"]  # a class without validation images is not drawn
    assert list(points.x) == [0.5, 0.8, 0.5] and list(points.y) == [0.9, 0.2, 0.5]
    sizes = dict(zip(points.text, points.marker.size))
    assert sizes["big"] > sizes["mid"] > sizes["small"]
    assert list(points.marker.color) == pytest.approx([0.4, -0.6, 0.0])
    assert list(diagonal.x) == [0, 1] and list(diagonal.y) == [0, 1]
    assert "%{text}" in points.hovertemplate and "training images" in points.hovertemplate
    assert fig.layout.xaxis.title.text == "a: per-class accuracy" and fig.layout.yaxis.title.text == "b: per-class " \
                                                                                                     "accuracy"


def test_class_scatter_without_train_counts_sizes_by_validation_images():
    c = ClassComparison("a", "b", classes=[ClassChange("x", None, 5, 0.2, 0.4), ClassChange("y", None, 5, 0.6, 0.6)])
    frame = c.frame()
    assert math.isnan(frame["train images"][0])
    points = charts.class_scatter_figure(frame, "a", "b").data[0]
    assert "validation images" in points.hovertemplate
    assert np.ptp(np.asarray(points.marker.size)) == 0  # equal sizes: all the same marker


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_write_class_scatter_writes_each_format(tmp_path, suffix):
    path = tmp_path / f"scatter{suffix}"
    charts.write_class_scatter(_comparison_with_a_missing_class().frame(), "a", "b", path, label=1)
    data = path.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif suffix == ".svg":
        text = data.decode()
        assert "<svg" in text
    else:
        assert b"plotly" in data and b"small" in data


def test_static_scatter_names_the_biggest_gains_and_losses(monkeypatch, tmp_path):
    from matplotlib.axes import Axes

    named = []
    real = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: named.append(text) or real(self, text, *a, **k))
    charts.write_class_scatter(_comparison_with_a_missing_class().frame(), "a", "b", tmp_path / "s.png", label=1)
    assert named == ["small", "big"]  # the biggest loss and the biggest gain; 'mid' did not change


def test_write_class_scatter_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match="must end in .html, .png, .svg, .pdf"):
        charts.write_class_scatter(_comparison_with_a_missing_class().frame(), "a", "b", tmp_path / "s.jpg")
