"""bench/recipe_ablation.py: what each variant changes in the study's final stage (the figures come from running it)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

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
