"""bench/train_throughput.py and bench/gpu.sh on tiny inputs (the figures themselves come from running them)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

from train.config import compiles

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_table_has_every_contender_and_the_trainer(tmp_path, capsys):
    bench = load_bench()
    before = torch.get_num_threads()
    try:
        bench.main(["--root", str(tmp_path / "none"), "--synthetic", "40", "--arch", "resnet18", "--sizes", "32",
                    "--batch", "8", "--steps", "1", "--load-batches", "1", "--threads", "1", "--no-decode",
                    "--trainer", "--trainer-epochs", "1", "--device", "cpu", "--augment", "strong"])
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| size"))
    row = next(line for line in lines if line.startswith("| 32 "))
    names, values = ([c.strip() for c in line.strip("|").split("|")] for line in (header, row))
    cells = dict(zip(names, values, strict=True))
    for name in ("memory", "cached", "device", "trainer"):
        assert float(cells[name]) > 0, name
    assert cells["compiled"] == cells["decode"] == "-"  # off on the CPU by default; --no-decode
    assert "device/memory **" in cells["ratios"] and "trainer/memory **" in cells["ratios"]
    assert cells["cache build"].endswith("/ 20")  # 20 classes of 2 synthetic JPEGs: one of each for training


def test_gpu_script_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--devcie", "cpu"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "unknown option --devcie" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--device"], "--device needs a value (cuda or cpu)"),
    (["--device", "tpu"], "--device must be cuda or cpu, not tpu"),
])
def test_gpu_script_refuses_a_bad_device_at_once(args, message):
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), *args], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_script_without_a_gpu_refuses_before_measuring():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 2 and "PyTorch sees no CUDA GPU here" in done.stderr and not done.stdout


def test_speed_options_rate_every_variant_against_the_trainers_default(capsys):
    bench = load_bench()
    before = torch.get_num_threads()
    try:
        bench.main(["--speed-options", "--arch", "resnet18", "--sizes", "32", "--batch", "4", "--steps", "1",
                    "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    line = capsys.readouterr().out.strip()
    assert line.startswith("resnet18 32 px, batch 4, CPU x1 threads")
    rates = dict(re.findall(r"(eager(?:\+fused)?) ([0-9.]+) img/s", line))
    assert set(rates) == {"eager", "eager+fused"} and all(float(v) > 0 for v in rates.values())
    assert f"eager {rates['eager']} img/s (1.00x eager)" in line  # the first variant is the baseline


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_speed_options_start_with_what_the_trainer_does_on_the_device(device):
    """The ratios are to the first variant: it must be the trainer's own default there (compile: auto)."""
    first = next(iter(load_bench().speed_options(torch.device(device)).values()))
    assert first.get("compile_model", False) == compiles("auto", device) and not first.get("fused")
