"""Grad-CAM speed: our engine and pytorch-grad-cam against a plain no_grad forward pass, in one run.

ResNet-50 (random weights: speed does not depend on them), one 224x224 image, CPU. Every repetition times
each contender once, in a rotating order, and the script prints medians and their ratios to the forward pass.

    nice python bench/gradcam.py [--repeats 15] [--threads 2] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.gradcam import explain, gradcam  # noqa: E402

STAGES = ["layer1", "layer2", "layer3", "layer4"]
GOALS = {  # contender -> the largest ratio to the forward pass that meets issue 4's goal
    "ours: Grad-CAM layer4": 1.2,
    "ours: top-5 classes layer4": 1.5,
    "ours: layer1..layer4 at once": 2.5,
}
SPEEDUP_GOAL = 3.0  # ours at least this much faster than pytorch-grad-cam


def contenders(model: torch.nn.Module, image: torch.Tensor) -> dict[str, Callable[[], object]]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    library = GradCAM(model=model, target_layers=[model.layer4])
    top1 = int(model(image).argmax())

    def plain_forward() -> object:
        with torch.no_grad():
            return model(image)

    return {
        "forward (no_grad)": plain_forward,
        "ours: Grad-CAM layer4": lambda: gradcam(model, image, "layer4"),
        "ours: top-5 classes layer4": lambda: explain(model, image, "layer4", top_k=5),
        "ours: layer1..layer4 at once": lambda: explain(model, image, STAGES),
        "pytorch-grad-cam GradCAM layer4": lambda: library(image, [ClassifierOutputTarget(top1)]),
    }


def measure(runs: dict[str, Callable[[], object]], repeats: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per contender; each repetition runs all of them once, in a rotated order."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        runs[n]()
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            runs[n]()
            times[n].append(clock() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier while other jobs load the machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    image = torch.randn(1, 3, args.size, args.size)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    medians = measure(contenders(model, image), args.repeats, clock)
    base = medians["forward (no_grad)"]
    print(f"ResNet-50, 1x3x{args.size}x{args.size}, {args.threads} threads, {args.clock} clock, "
          f"median of {args.repeats}")
    for name, seconds in medians.items():
        ratio = seconds / base
        goal = f"  (goal <= {GOALS[name]}x: {_verdict(ratio <= GOALS[name])})" if name in GOALS else ""
        print(f"{name:34s} {seconds * 1000:8.1f} ms  {ratio:5.2f}x forward{goal}")
    speedup = medians["pytorch-grad-cam GradCAM layer4"] / medians["ours: Grad-CAM layer4"]
    print(f"ours vs pytorch-grad-cam at layer4: {speedup:.2f}x faster"
          f"  (goal >= {SPEEDUP_GOAL}x: {_verdict(speedup >= SPEEDUP_GOAL)})")


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    main()
