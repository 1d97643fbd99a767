"""core/charts.py: smoothing, pipeline-wide x axes, stage marks, per-class tables and figures."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core import charts
from core.evaluation import class_result


def test_ema_zero_weight_is_identity_and_skips_nans():
    values = [1.0, float("nan"), 3.0, 5.0]
    out = charts.ema(values, 0.0)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 3.0 and out[3] == 5.0


def test_ema_is_debiased_and_smooths():
    out = charts.ema([10.0, 0.0, 0.0], 0.5)
    assert out[0] == pytest.approx(10.0)  # first point not pulled towards 0 (debiased)
    assert out[1] == pytest.approx((0.5 * 5.0) / (1 - 0.25))  # 10*0.5*0.5 + 0 ... / (1 - 0.5^2)
    assert out[2] < out[1] < out[0]
    with pytest.raises(ValueError):
        charts.ema([1.0], 1.0)


def _tensorboard_ema(values, weight):
    """TensorBoard's smoothing written out as a loop (the reference ``charts.ema`` is checked against)."""
    out, last, steps = [], 0.0, 0
    for value in values:
        if math.isnan(value):
            out.append(math.nan)
            continue
        last, steps = last * weight + (1 - weight) * value, steps + 1
        out.append(last / (1 - weight ** steps))
    return out


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.6, 0.99])
def test_ema_matches_tensorboards_loop_with_gaps(weight):
    values = np.random.default_rng(1).normal(size=500)
    values[[0, 5, 6, 250, 499]] = np.nan
    np.testing.assert_allclose(charts.ema(values, weight), _tensorboard_ema(values, weight), rtol=1e-9, atol=1e-12)


def test_thinned_keeps_short_curves_and_the_extremes_of_long_ones():
    x, y = np.arange(10.0), np.arange(10.0)
    assert charts.thinned(x, y, 20)[1] is y
    x = np.arange(100_000.0)
    y = np.sin(x / 5000) + np.random.default_rng(0).normal(scale=0.01, size=x.size)
    y[31_337], y[77_000], y[500] = 9.0, -9.0, np.nan  # a spike each way and a gap
    tx, ty = charts.thinned(x, y, 2000)
    assert len(tx) <= 2000 and np.all(np.diff(tx) > 0)
    assert tx[0] == 0 and tx[-1] == x[-1]
    assert 31_337 in tx and 77_000 in tx  # spikes survive thinning
    np.testing.assert_array_equal(ty, y[tx.astype(int)])
    assert np.diff(tx).max() <= 2 * 100_000 / 998  # every stretch of the curve keeps points: no long hole


def test_curves_figure_thins_long_per_step_curves():
    n = 50_000
    frame = pd.DataFrame({"stage": np.repeat([0, 1], n // 2), "epoch": 1, "step": np.tile(np.arange(1, n // 2 + 1), 2),
                          "train_loss": np.linspace(3, 0.5, n)})
    fig = charts.curves_figure({"a": frame}, ["train_loss"], x_column="step", smoothing=0.6)
    assert len(fig.data) == 2 and all(len(t.x) <= charts.MAX_POINTS for t in fig.data)
    assert fig.data[1].x[-1] == n and fig.data[1].y[-1] == pytest.approx(0.5, abs=1e-3)


def _frame(rows):
    return pd.DataFrame(rows, columns=["stage", "epoch", "step", "val_acc"])


def test_global_x_numbers_epochs_through_the_pipeline():
    frame = _frame([(0, 0, 0, .1), (0, 1, 0, .2), (1, 0, 0, .3), (1, 1, 0, .4), (1, 2, 0, .5)])
    x = charts.global_x(frame, "epoch")
    assert x.tolist() == [1, 2, 3, 4, 5]
    assert charts.stage_boundaries(frame, x) == [(3.0, 1)]


def test_global_x_shifts_steps_only_when_a_stage_restarts_counting():
    restarting = _frame([(0, 0, 0, 0), (0, 0, 9, 0), (1, 0, 0, 0), (1, 0, 4, 0)])
    assert charts.global_x(restarting, "step").tolist() == [0, 9, 10, 14]
    already_global = _frame([(0, 0, 0, 0), (0, 0, 9, 0), (1, 0, 10, 0), (1, 0, 14, 0)])
    assert charts.global_x(already_global, "step").tolist() == [0, 9, 10, 14]


def test_curves_figure_overlays_runs_and_marks_stage_starts():
    a = _frame([(0, 0, 0, .1), (0, 1, 0, .2), (1, 0, 0, .3)])
    b = _frame([(0, 0, 0, .2), (0, 1, 0, .4)])
    fig = charts.curves_figure({"a": a, "b": b}, ["val_acc"], smoothing=0.5,
                               stage_names={"a": ["pre", "fine"]})
    named = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in named] == ["a · validation accuracy", "b · validation accuracy"]
    assert len(fig.data) == 4  # raw (faint) + smoothed per run
    texts = [a.text for a in fig.layout.annotations]
    assert texts == ["fine"]
    smoothed_a = list(named[0].y)  # each stage smoothed on its own: stage 2 starts at its own value
    assert smoothed_a == pytest.approx([.1, charts.ema([.1, .2], 0.5)[1], .3])


def test_accuracy_curves_keep_their_axis_between_0_and_1_even_for_a_flat_line():
    flat = _frame([(0, 0, 0, 1.0), (0, 1, 0, 1.0), (0, 2, 0, 1.0)])
    low, high = charts.curves_figure({"a": flat}, ["val_acc"]).layout.yaxis.range
    assert 0.88 <= low < 1.0 < high <= 1.011
    low, high = charts.share_range([0.0, 0.0])
    assert -0.011 <= low < 0.0 < 0.1 <= high < 0.15
    assert charts.share_range([0.2, 0.8]) == pytest.approx([0.17 - 0.01, 0.83 + 0.01])
    assert charts.curves_figure({"a": flat}, ["val_loss"]).layout.yaxis.range is None  # not a share: plotly's


def test_format_eta_and_progress():
    assert charts.format_eta(None) == "unknown"
    assert charts.format_eta(12.4) == "12 s"
    assert charts.format_eta(185) == "3 min 05 s"
    assert charts.format_eta(3720) == "1 h 02 min"
    assert charts.progress_fraction(5, 20) == 0.25
    assert charts.progress_fraction(None, 20) == 0.0
    assert charts.progress_fraction(30, 20) == 1.0


def _result():
    confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 4, 0]])
    return class_result(["cat", "dog", "eel"], confusion, train_counts=[100, 40, 4])


def test_per_class_frame_and_imbalance():
    frame = charts.per_class_frame(_result())
    assert frame["class"].tolist() == ["cat", "dog", "eel"]
    assert frame["accuracy"].tolist() == pytest.approx([0.8, 0.75, 0.0])
    assert frame["train images"].tolist() == [100, 40, 4]
    assert charts.imbalance_ratio(frame["train images"]) == 25
    assert math.isnan(charts.imbalance_ratio([0, 0]))


def test_most_confused_classes_orders_by_errors_in_and_out():
    confusion = np.array([[9, 0, 0, 1], [0, 5, 5, 0], [0, 3, 7, 0], [0, 0, 0, 4]])
    # class 1: 5 out + 3 in = 8; class 2: 3 out + 5 in = 8; class 0: 1; class 3: 1
    assert charts.most_confused_classes(confusion, 2) == [1, 2]


def test_the_sub_matrix_holds_the_most_confused_pairs():
    """ketch -> schooner (8) is the biggest pair, though each of them is in fewer errors than the noisy classes."""
    confusion = np.diag([20] * 6)
    confusion[0, 1] = 8  # the pair
    for a, b in ((2, 3), (3, 4), (4, 5), (5, 2), (2, 4), (3, 5)):
        confusion[a, b] = 3  # many small errors among classes 2..5: more involvement each (9 or more)
    top = charts.most_confused_classes(confusion, 2)
    assert top == [0, 1]
    assert set(charts.most_confused_classes(confusion, 4)) >= {0, 1}
    assert sorted(charts.most_confused_classes(confusion, 6)) == list(range(6))
    assert len(charts.most_confused_classes(np.diag([5, 5, 5]), 2)) == 2  # no errors: still n classes


def test_matrix_cells_print_what_their_colour_shows():
    result = _result()
    shares = charts.confusion_figure(result["confusion"], result["classes"], normalize=True).data[0]
    counts = charts.confusion_figure(result["confusion"], result["classes"], normalize=False, diagonal=True).data[0]
    assert np.asarray(shares.text)[2].tolist() == ["0%", "100%", ""]  # eel: all to dog; its diagonal hidden
    assert np.asarray(counts.text)[0].tolist()[0] == "8"  # the diagonal shown: its count


def test_confusion_figure_restricts_to_indices_with_row_shares():
    result = _result()
    fig = charts.confusion_figure(result["confusion"], result["classes"], indices=[1, 2], diagonal=True)
    heat = fig.data[0]
    assert list(heat.x) == ["dog", "eel"]
    # row 'eel' has 4 images, all predicted 'dog'
    assert np.asarray(heat.z)[1].tolist() == [1.0, 0.0]
    # row 'dog' has 4 images (1 went to 'cat', outside the sub-matrix): shares of the full row
    assert np.asarray(heat.z)[0].tolist() == [0.75, 0.0]


def test_confusion_figure_cuts_long_class_names_on_its_axes_and_makes_room_for_them():
    long = "class_007_an_extremely_long_descriptive_category_name"
    classes = [f"{long}_{i}" for i in range(20)]
    confusion = np.eye(20) * 3 + 1
    fig = charts.confusion_figure(confusion, classes)
    assert list(fig.data[0].x) == classes  # the cells and the hover keep the whole names
    assert list(fig.layout.xaxis.ticktext) == list(fig.layout.yaxis.ticktext) == [charts.short_label(c) for c in classes]
    assert all(len(t) == charts.LABEL_CHARS and t.endswith("…") for t in fig.layout.xaxis.ticktext)
    short = charts.confusion_figure(confusion, [f"c{i}" for i in range(20)])
    assert fig.layout.height - short.layout.height == 6 * (charts.LABEL_CHARS - 3)  # room for the longer labels
    assert charts.short_label("dog") == "dog"


def test_confusion_figure_without_diagonal_scales_colours_to_the_errors():
    result = _result()
    heat = charts.confusion_figure(result["confusion"], result["classes"]).data[0]
    z = np.asarray(heat.z, dtype=float)
    assert np.isnan(np.diag(z)).all()
    assert heat.zmax == pytest.approx(1.0)  # eel -> dog is the largest error share
    assert np.asarray(heat.customdata)[0, 0, 0] == 8  # hover still gives the diagonal count


def test_accuracy_vs_size_has_a_point_per_class_with_accuracy():
    fig = charts.accuracy_vs_size_figure(charts.per_class_frame(_result()))
    assert list(fig.data[0].text) == ["cat", "dog", "eel"]
    assert fig.layout.xaxis.type == "log"


def test_probabilities_frame_top_k():
    frame = charts.probabilities_frame([0.1, 0.6, 0.3], ["a", "b", "c"], k=2)
    assert frame["class"].tolist() == ["b", "c"]
    assert frame["probability"].tolist() == pytest.approx([0.6, 0.3])


def test_confusion_view_stays_readable_at_257_classes():
    rng = np.random.default_rng(0)
    n = 257
    confusion = np.diag(rng.integers(5, 30, n))
    for _ in range(400):
        confusion[rng.integers(0, n), rng.integers(0, n)] += 1
    classes = [f"{i:03d}.class" for i in range(n)]
    top = charts.most_confused_classes(confusion, 20)
    sub = charts.confusion_figure(confusion, classes, top)
    assert len(sub.data[0].x) == 20 and sub.layout.xaxis.showticklabels  # names readable in the sub-matrix
    full = charts.confusion_figure(confusion, classes)
    assert np.asarray(full.data[0].z).shape == (n, n)
    assert full.layout.xaxis.showticklabels is False and full.layout.height <= 900  # hover names the cells


def test_legend_of_many_runs_gets_its_own_room_below_the_axis_title():
    frames = {run: _frame([(0, 0, 0, .1), (0, 1, 0, .2)]).assign(train_acc=.3, val_balanced_acc=.1)
              for run in ("a", "b", "c")}
    fig = charts.curves_figure(frames, ["train_acc", "val_acc", "val_balanced_acc"], title="Accuracy")
    legend = fig.layout.legend
    assert (legend.yref, legend.yanchor, legend.y) == ("container", "bottom", 0)  # pinned to the figure's bottom
    rows = charts.legend_rows(9)
    assert fig.layout.margin.b >= charts.LEGEND_ROW_PX * (rows + 2)  # the legend's rows plus the axis title


def test_log_axis_of_class_sizes_reads_as_round_numbers():
    frame = pd.DataFrame({"class": list("abcd"), "train images": [9.0, 30.0, 60.0, 240.0],
                          "val images": [2.0] * 4, "correct": [1.0] * 4, "accuracy": [.5, .6, .7, .8]})
    axis = charts.accuracy_vs_size_figure(frame).layout.xaxis
    assert list(axis.tickvals) == [10, 20, 50, 100, 200] and list(axis.ticktext) == ["10", "20", "50", "100", "200"]
    assert charts.nice_log_ticks(1, 9) == [1, 2, 5]
