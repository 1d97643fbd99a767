"""Out-of-distribution warning: how unlike the run's validation images an input looks to the model.

Two scores from the logits, higher meaning "more like the training data":

- the maximum softmax probability (MSP, Hendrycks & Gimpel, ICLR 2017);
- the negative energy ``logsumexp(logits)`` (Liu et al., NeurIPS 2020), which does not saturate the way a
  softmax does, so a confident-looking prediction on a foreign image can still stand out.

Thresholds come from the run's validation set: the score that ``KEEP`` (95%) of validation images reach
(``calibrate``). The trainer stores them with ``best.pt`` under the key ``"ood"``;
``python -m train ood-thresholds CHECKPOINT`` adds them to older checkpoints. ``assess`` places one image
against them and says it in words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KEEP = 0.95  # share of validation images a threshold lets through
QUANTILES = 101  # stored quantiles of each score: an image's percentile among the validation images
WEAK_CONFIDENCE = 0.1  # an MSP threshold under this share of the way from chance to certain, and under 10x chance,
# is too low to tell foreign images apart (55% with 2 classes, 19% with 10, 9.9% with 101, 1% with 1000)
FEW_IMAGES = 100  # below this many validation images, the 5% threshold rests on a handful: the verdict says so


def scores(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maximum softmax probability, logsumexp = negative energy) of logits [N, classes]."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    msp = np.exp(top[:, 0] - lse)
    return msp, lse


def calibrate(msp: np.ndarray, logsumexp: np.ndarray, keep: float = KEEP) -> dict[str, Any]:
    """The checkpoint's ``"ood"`` record from the validation images' scores (plain floats and lists)."""
    msp, logsumexp = np.asarray(msp, dtype=np.float64), np.asarray(logsumexp, dtype=np.float64)
    if msp.size == 0:
        return {}
    levels = np.linspace(0, 1, QUANTILES)
    return {
        "keep": keep,
        "val_images": int(msp.size),
        "msp_threshold": float(np.quantile(msp, 1 - keep)),
        "energy_threshold": float(np.quantile(logsumexp, 1 - keep)),
        "msp_quantiles": [float(v) for v in np.quantile(msp, levels)],
        "energy_quantiles": [float(v) for v in np.quantile(logsumexp, levels)],
    }


@dataclass(frozen=True)
class Assessment:
    """Where one image stands: its scores, their percentiles among validation images, a verdict in words."""

    msp: float
    energy: float
    msp_percentile: float | None
    energy_percentile: float | None
    level: str  # "in", "borderline", "out" or "unknown" (no thresholds stored)
    sentence: str

    def record(self) -> dict[str, Any]:
        """What a prediction record (predictions.json, the export zip) keeps of it."""
        return {"level": self.level, "msp": self.msp, "energy": self.energy, "sentence": self.sentence}


def _apart(value: float, threshold: float, kind: str, digits: int) -> tuple[str, str]:
    """The value and its threshold with the fewest decimals, from ``digits``, that tell them apart (a score just
    under its threshold must not read as equal to it)."""
    for places in range(digits, digits + 4):
        shown = format(value, f".{places}{kind}"), format(threshold, f".{places}{kind}")
        if shown[0] != shown[1]:
            break
    return shown


def _percentile(value: float, quantiles: list[float]) -> float:
    """Share (0-100) of validation images whose score is below ``value``, from the stored quantiles."""
    levels = np.linspace(0, 100, len(quantiles))
    return float(np.interp(value, quantiles, levels, left=0.0, right=100.0))


def assess(logits: np.ndarray, stats: dict[str, Any] | None) -> Assessment:
    """Place one image's logits [classes] against the checkpoint's thresholds and say it in one sentence."""
    msp, lse = (float(v[0]) for v in scores(np.asarray(logits)[None]))
    if not stats:
        return Assessment(msp, lse, None, None, "unknown",
                          "No out-of-distribution thresholds are stored with this checkpoint; add them with "
                          "`python -m train ood-thresholds CHECKPOINT`.")
    p_msp, p_energy = _percentile(msp, stats["msp_quantiles"]), _percentile(lse, stats["energy_quantiles"])
    low_msp, low_energy = msp < stats["msp_threshold"], lse < stats["energy_threshold"]
    share = f"{stats['keep']:.0%}"
    (msp_text, msp_limit), (lse_text, lse_limit) = _apart(msp, stats["msp_threshold"], "%", 1), \
        _apart(lse, stats["energy_threshold"], "f", 2)
    detail = (f"confidence {msp_text} (threshold {msp_limit}, higher than {p_msp:.0f}% of validation images) and "
              f"energy score {lse_text} (threshold {lse_limit}, higher than {p_energy:.0f}% of them)")
    if low_msp and low_energy:
        level, sentence = "out", (f"Out of distribution: this image is unlike the images the model was trained on, "
                                  f"so do not trust the prediction: {detail}; {share} of validation images score "
                                  "higher on both.")
    elif low_msp or low_energy:
        level, sentence = "borderline", (f"Possibly out of distribution: one score is lower than {share} of "
                                         f"validation images reach, so treat the prediction with caution: {detail}.")
    else:
        level, sentence = "in", f"Looks like the training data: {detail}." + _weak(stats, len(np.asarray(logits)))
    return Assessment(msp, lse, p_msp, p_energy, level, sentence + _few_images(stats.get("val_images")))


def _weak(stats: dict[str, Any], classes: int) -> str:
    """A caveat for an "in" verdict when the model is unsure even of its validation images: a low threshold lets
    through a blank or foreign image that merely does not look like any class in particular."""
    chance = 1 / max(classes, 2)
    if stats["msp_threshold"] >= min(10 * chance, chance + WEAK_CONFIDENCE * (1 - chance)):
        return ""
    return (f" This model is unsure even of its own validation images ({stats['keep']:.0%} of them above "
            f"{stats['msp_threshold']:.1%} confidence, with {classes} classes), so this check lets through images "
            "that are merely unlike any class.")


def _few_images(count: Any) -> str:
    """A caveat when the thresholds were calibrated on fewer than ``FEW_IMAGES`` validation images."""
    if not isinstance(count, int) or count >= FEW_IMAGES:
        return ""
    return (f" The thresholds come from only {count} validation image{'s' if count != 1 else ''}, so this verdict "
            "is rough.")
