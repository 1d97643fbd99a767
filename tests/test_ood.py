"""Out-of-distribution scores: thresholds from validation scores, the verdict in words, stored by the trainer
with its checkpoints, and added to older checkpoints by `python -m train ood-thresholds` (a subprocess)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from core import ood, paths
from core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from tests.app_fixtures import REPO
from tests.test_engine import one_thread, run_tiny, tiny_config  # noqa: F401
from train.ood_cmd import add_ood_thresholds


def test_scores_are_softmax_maximum_and_logsumexp():
    logits = np.array([[2.0, 0.0, -1.0], [100.0, 100.0, 100.0]])
    msp, lse = ood.scores(logits)
    torch.testing.assert_close(torch.from_numpy(msp), torch.tensor(logits).softmax(1).amax(1))
    torch.testing.assert_close(torch.from_numpy(lse), torch.tensor(logits).logsumexp(1))  # no overflow at 100


def test_thresholds_keep_95_percent_of_validation_images():
    rng = np.random.default_rng(0)
    msp, lse = rng.uniform(0.2, 1.0, 1000), rng.normal(8, 2, 1000)
    stats = ood.calibrate(msp, lse)
    assert stats["val_images"] == 1000 and stats["keep"] == 0.95
    assert np.mean(msp >= stats["msp_threshold"]) == pytest.approx(0.95, abs=0.002)
    assert np.mean(lse >= stats["energy_threshold"]) == pytest.approx(0.95, abs=0.002)
    assert len(stats["msp_quantiles"]) == ood.QUANTILES and stats["energy_quantiles"] == sorted(stats["energy_quantiles"])


def test_verdicts_in_words():
    rng = np.random.default_rng(1)
    val_logits = rng.normal(0, 1, (500, 4)) + np.eye(4)[rng.integers(0, 4, 500)] * 8  # confident, large logits
    stats = ood.calibrate(*ood.scores(val_logits))
    typical = ood.assess(np.array([9.0, 0.2, -0.5, 0.1]), stats)
    assert typical.level == "in" and typical.sentence.startswith("Looks like the training data")
    # a confident-looking but small-logit image: the softmax is high, the energy score gives it away
    foreign = ood.assess(np.array([6.0, -10.0, -10.0, -10.0]), stats)
    assert foreign.msp > stats["msp_threshold"] and foreign.level == "borderline" and "caution" in foreign.sentence
    far = ood.assess(np.array([0.1, 0.0, 0.05, -0.1]), stats)
    assert far.level == "out" and far.sentence.startswith("Out of distribution")
    assert far.energy_percentile < 5 and "validation images" in far.sentence
    unknown = ood.assess(np.array([1.0, 0.0, 0.0, 0.0]), {})
    assert unknown.level == "unknown" and "ood-thresholds" in unknown.sentence
    just_under = {**stats, "energy_threshold": float(ood.scores(np.array([[9.0, 0.2, -0.5, 0.1]]))[1][0]) + 0.001}
    close = ood.assess(np.array([9.0, 0.2, -0.5, 0.1]), just_under)  # 0.001 under: the sentence must show it
    score, threshold = re.search(r"energy score (\S+) \(threshold (\S+),", close.sentence).groups()
    assert close.level == "borderline" and score != threshold and len(score.split(".")[1]) == 3
    assert "rough" not in typical.sentence  # 500 validation images: no caveat


def test_a_model_unsure_of_its_own_validation_images_says_its_verdict_lets_foreign_ones_through():
    """A weak 101-class model (a 40% one): its validation images' confidence is low, so a blank image passes."""
    rng = np.random.default_rng(3)
    unsure = rng.normal(0, 1, (500, 101)) + np.eye(101)[rng.integers(0, 101, 500)] * 2.5
    stats = ood.calibrate(*ood.scores(unsure))
    assert stats["msp_threshold"] < 0.0990  # under 10x chance
    blank = ood.assess(unsure[0], stats)
    assert blank.level == "in" and blank.sentence.endswith(
        f"This model is unsure even of its own validation images (95% of them above {stats['msp_threshold']:.1%} "
        "confidence, with 101 classes), so this check lets through images that are merely unlike any class.")
    sure = np.random.default_rng(4).normal(0, 1, (500, 101)) + np.eye(101)[rng.integers(0, 101, 500)] * 12
    confident = ood.calibrate(*ood.scores(sure))
    assert "unsure" not in ood.assess(sure[0], confident).sentence


@pytest.mark.parametrize("classes, threshold, weak", [(10, 0.15, True), (10, 0.30, False), (2, 0.53, True),
                                                     (2, 0.70, False), (101, 0.09, True), (101, 0.20, False),
                                                     (1000, 0.009, True), (1000, 0.05, False)])
def test_the_unsure_model_caveat_is_measured_from_chance_so_few_classes_get_it_too(classes, threshold, weak):
    """With 10 classes every image scores at least 10%: a 15% threshold is barely above chance, and is weak."""
    stats = {"msp_threshold": threshold, "energy_threshold": -50.0, "keep": 0.95, "val_images": 500,
             "msp_quantiles": [0.0, 1.0], "energy_quantiles": [-50.0, 50.0]}
    verdict = ood.assess(np.eye(classes)[0] * 30, stats)
    assert verdict.level == "in" and ("unsure even of its own" in verdict.sentence) == weak


def test_a_verdict_from_a_handful_of_validation_images_says_it_is_rough():
    rng = np.random.default_rng(2)
    val_logits = rng.normal(0, 1, (12, 4)) + np.eye(4)[rng.integers(0, 4, 12)] * 8
    few = ood.calibrate(*ood.scores(val_logits))
    for logits in ([9.0, 0.2, -0.5, 0.1], [0.1, 0.0, 0.05, -0.1]):
        verdict = ood.assess(np.array(logits), few)
        assert verdict.sentence.endswith("The thresholds come from only 12 validation images, so this verdict is "
                                         "rough.")
    one = ood.assess(np.array([9.0, 0.2, -0.5, 0.1]), ood.calibrate(*ood.scores(val_logits[:1])))
    assert "only 1 validation image," in one.sentence


def test_trainer_stores_thresholds_and_the_command_recomputes_them_for_older_checkpoints(tmp_path):
    assert run_tiny(tiny_config(tmp_path, epochs=(1,))) == "finished"
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    stored = load_checkpoint(best)["ood"]
    assert stored["val_images"] == 6 and 0 < stored["msp_threshold"] <= 1
    older = {k: v for k, v in load_checkpoint(best).items() if k != "ood"}  # as written before this feature
    save_checkpoint(best, older)
    done = subprocess.run([sys.executable, "-m", "train", "ood-thresholds", str(best)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "6 validation images" in done.stdout
    again = load_checkpoint(best)["ood"]
    assert again["val_images"] == 6
    assert again["msp_threshold"] == pytest.approx(stored["msp_threshold"], abs=1e-5)
    assert again["energy_threshold"] == pytest.approx(stored["energy_threshold"], abs=1e-4)


def test_thresholds_of_a_checkpoint_rewritten_meanwhile_are_not_saved_over_it(tmp_path, monkeypatch):
    """A trainer that writes a new last.pt while the command evaluates the old one: the new file is kept."""
    from train import engine

    assert run_tiny(tiny_config(tmp_path, epochs=(1,))) == "finished"
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    newer = {**load_checkpoint(best), "epoch": 7}
    real_evaluate = engine.evaluate_checkpoint

    def trainer_writes_meanwhile(*args, **kwargs):
        found = real_evaluate(*args, **kwargs)
        save_checkpoint(best, newer)
        return found

    monkeypatch.setattr(engine, "evaluate_checkpoint", trainer_writes_meanwhile)
    with pytest.raises(CheckpointError, match="was rewritten while its thresholds were computed"):
        add_ood_thresholds(best)
    assert load_checkpoint(best)["epoch"] == 7


def test_thresholds_are_refused_for_a_checkpoint_whose_run_is_training(tmp_path):
    assert run_tiny(tiny_config(tmp_path, epochs=(1,))) == "finished"
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom train.trainer_lock import trainer_lock\n"
                               "with trainer_lock('tiny'):\n    print('held', flush=True)\n    time.sleep(120)"],
                              cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # a trainer of the run, as far as the lock says
        before = best.stat().st_mtime_ns
        with pytest.raises(CheckpointError, match=f"{best} belongs to run tiny, which is training right now"):
            add_ood_thresholds(best)
        assert best.stat().st_mtime_ns == before
    finally:
        holder.kill()
        holder.wait()
