"""Grad-CAM speed: our engine, pytorch-grad-cam and captum against a plain no_grad forward pass, in one run.

ResNet-50 (random weights: speed does not depend on them) at 224 px, batch 1 and 16; on CUDA under bf16 autocast
with warm-up iterations and ``torch.cuda.synchronize()`` around every timed call, fp32 on the CPU. Every repetition
times each contender once, in a rotating order; the script prints a markdown table of medians as ratios to the
forward pass of the same batch in the same run. pytorch-grad-cam's ``GradCAM`` and captum's ``LayerGradCam``
(upsampled to the input, bilinear) explain the same layer4 and top-1 classes; either is left out when not installed.

    nice python bench/gradcam.py --device cpu [--batches 1 16] [--repeats 5] [--threads 2] [--clock wall|cpu]
    python bench/gradcam.py --device cuda [--repeats 30] [--warmup 5]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.gradcam import explain, gradcam

STAGES = ["layer1", "layer2", "layer3", "layer4"]
FORWARD = "plain no_grad forward"
OURS = "ours: Grad-CAM at layer4"
GOALS = {  # contender -> the largest ratio to the forward pass that meets issue 10's goal
    OURS: 1.2,
    "ours: top-5 classes at layer4": 1.3,
    "ours: layer1..layer4 at once": 2.0,
}
LIBRARIES = ("pytorch-grad-cam GradCAM at layer4", "captum LayerGradCam at layer4")
SPEEDUP_GOAL = 3.0  # ours at least this much faster than pytorch-grad-cam

Run = Callable[[], object]


def contenders(model: torch.nn.Module, images: torch.Tensor) -> dict[str, Run]:
    """Every contender for one batch; the libraries' top-1 targets are computed here, outside the timing."""
    with torch.no_grad():
        top1 = model(images).argmax(dim=1)
    runs: dict[str, Run] = {
        FORWARD: lambda: _no_grad(model, images),
        OURS: lambda: gradcam(model, images, "layer4"),
        "ours: top-5 classes at layer4": lambda: explain(model, images, "layer4", top_k=5),
        "ours: layer1..layer4 at once": lambda: explain(model, images, STAGES),
    }
    for name, build in zip(LIBRARIES, (_pytorch_grad_cam, _captum)):
        try:
            runs[name] = build(model, images, top1)
        except ImportError as missing:
            print(f"{name}: left out ({missing})", file=sys.stderr)
    return runs


def _no_grad(model: torch.nn.Module, images: torch.Tensor) -> object:
    with torch.no_grad():
        return model(images)


def _pytorch_grad_cam(model: torch.nn.Module, images: torch.Tensor, top1: torch.Tensor) -> Run:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # .float(): it copies activations and gradients to NumPy, which has no bfloat16
    library = GradCAM(model=model, target_layers=[model.layer4], reshape_transform=lambda t: t.float())
    targets = [ClassifierOutputTarget(c) for c in top1.tolist()]
    return lambda: library(images, targets)


def _captum(model: torch.nn.Module, images: torch.Tensor, top1: torch.Tensor) -> Run:
    from captum.attr import LayerAttribution, LayerGradCam

    library = LayerGradCam(model, model.layer4)
    size = tuple(images.shape[-2:])
    return lambda: LayerAttribution.interpolate(
        library.attribute(images, target=top1, relu_attributions=True), size, "bilinear"
    )


def measure(runs: dict[str, Run], repeats: int, warmup: int, clock: Callable[[], float],
            sync: Callable[[], None], precision: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """Median seconds per contender; each repetition runs all of them once, in a rotated order."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    with precision():
        for _ in range(warmup):
            for n in names:
                runs[n]()
        for r in range(repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                sync()
                start = clock()
                runs[n]()
                sync()
                times[n].append(clock() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def table(medians: dict[int, dict[str, float]]) -> str:
    """A markdown table: contenders as rows, batches as columns, ratios to the forward pass of that batch."""
    batches = list(medians)
    lines = ["| contender | " + " | ".join(f"batch {b}" for b in batches) + " | goal |",
             "| --- |" + " --- |" * (len(batches) + 1)]
    names = list(dict.fromkeys(n for per_batch in medians.values() for n in per_batch))
    for name in names:
        cells = []
        for b in batches:
            seconds, base = medians[b].get(name), medians[b][FORWARD]
            ratio = None if seconds is None else seconds / base
            cells.append("-" if ratio is None else f"{seconds * 1000:.1f} ms = 1.00x" if name == FORWARD else
                         f"{ratio:.2f}x" + _verdict(ratio <= GOALS[name] if name in GOALS else None))
        goal = f"<= {GOALS[name]}x" if name in GOALS else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {goal} |")
    for library in LIBRARIES:
        if all(library in medians[b] for b in batches):
            speedups = [medians[b][library] / medians[b][OURS] for b in batches]
            goal = SPEEDUP_GOAL if library == LIBRARIES[0] else None
            cells = [f"{s:.2f}x faster" + _verdict(None if goal is None else s >= goal) for s in speedups]
            lines.append(f"| ours vs {library.split()[0]} (layer4) | " + " | ".join(cells)
                         + f" | {'>= ' + str(goal) + 'x' if goal else ''} |")
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "" if met is None else " (met)" if met else " (NOT met)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 1 on the CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (CPU only: steadier while other jobs load it)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here.")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures the CPU's work only: use the wall clock on CUDA.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = torchvision.models.resnet50(weights=None).eval().to(device, memory_format=memory_format)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    precision = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    medians = {}
    for batch in args.batches:
        images = torch.randn(batch, 3, args.size, args.size, device=device).to(memory_format=memory_format)
        with precision():
            runs = contenders(model, images)
        medians[batch] = measure(runs, args.repeats, warmup, clock, sync, precision)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(f"ResNet-50 at {args.size} px on {where}, {'bf16 autocast' if cuda else 'fp32'}"
          f"{', channels_last' if args.channels_last else ''}, torch {torch.__version__}, {args.clock} clock, "
          f"median of {args.repeats} after {warmup} warm-up rounds\n")
    print(table(medians))


if __name__ == "__main__":
    main()
