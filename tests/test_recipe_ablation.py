"""bench/recipe_ablation.py: what each variant changes in the study's final stage (the figures come from running it)."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    """The script as a module; the import path it extends (bench/ first) is put back for the other tests."""
    spec = importlib.util.spec_from_file_location("recipe_ablation", REPO / "bench" / "recipe_ablation.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_variants_scale_the_stage_they_change():
    bench = load_bench()
    base = bench.settings("base", "gpu", None, "scratch")
    assert base == {"init": "scratch", "tta": False}  # the shipped config as it is, validated without flips
    assert bench.settings("size-x1.25", "gpu", None, "scratch")["image_size"] == 120  # 1.25 x the shipped 96 px
    longer = bench.settings("epochs-x2", "cpu", 6, "scratch")
    assert (longer["epochs"], longer["warmup_epochs"]) == (12, 2)  # twice the epochs asked for, and the warm-up
    half = bench.settings("bs-half", "cpu", None, Path("/ckpt/best.pt"))
    assert (half["batch_size"], half["lr"], half["init"]) == (32, 0.025, "/ckpt/best.pt")  # 64 / 0.05 at cpu
    ramp = bench.settings("res-ramp", "cpu", None, "scratch")
    assert (ramp["train_size_start"], ramp["image_size"]) == (48, 64)


def test_scratch_runs_are_named_apart_from_pretrained_ones():
    bench = load_bench()
    assert bench.run_name("mix", argparse.Namespace(scale="gpu", init="scratch")) == "ablate-gpu-scratch-mix"
    assert bench.run_name("mix", argparse.Namespace(scale="cpu", init=Path("/x/best.pt"))) == "ablate-cpu-mix"


@pytest.mark.parametrize("extra, message", [
    (["--variants", "base,typo"], "unknown variant 'typo'; choose from base, mix"),
    (["--test-sizes", "64,abc"], "--test-sizes '64,abc': invalid literal"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, not 0"),
    (["--out", "/no/such/folder/report.md"], "--out /no/such/folder/report.md: its folder does not exist"),
    ([], "The Caltech-101 data set was not found at"),
])
def test_arguments_are_refused_before_anything_trains(tmp_path, extra, message):
    """A typo must not surface after hours of training: every argument is checked first."""
    done = subprocess.run([sys.executable, "bench/recipe_ablation.py", "--init", "scratch", "--home",
                           str(tmp_path / "home"), "--data-root", str(tmp_path / "nodata"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "home").exists()  # nothing started
