"""Faithfulness of each explanation method on the demo model: deletion and insertion AUC (Petsiuk et al., RISE,
BMVC 2018) on the validation set of its last stage (the synthetic ``shapes-lt``).

For each image the map of its predicted class orders the input's pixels, most important first. *Deletion*
replaces them, in ``STEPS`` equal slices, with the mean colour (0 after normalisation) and follows the class's
softmax probability: a faithful map makes it fall fast (low AUC is better). *Insertion* starts from a heavily
blurred copy and puts the original pixels back in the same order: the probability should rise fast (high AUC is
better). A random ordering is the floor every method must beat. AUC is the mean probability over the steps
(trapezoid rule over fractions 0..1). All maps are at the checkpoint's recommended layer unless --layer says.

    nice python bench/faithfulness.py --checkpoint PATH [--limit 60] [--layer layer2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.checkpoints import load_checkpoint, load_model  # noqa: E402
from core.datasets import open_dataset  # noqa: E402
from core.gradcam import explain, recommended_layer, supported_layers  # noqa: E402

STEPS = 16
VARIANTS = {  # label -> (method, aug_smooth, eigen_smooth)
    "Grad-CAM": ("gradcam", False, False),
    "Grad-CAM + aug smoothing": ("gradcam", True, False),
    "Grad-CAM + eigen smoothing": ("gradcam", False, True),
    "Grad-CAM++": ("gradcam++", False, False),
    "LayerCAM": ("layercam", False, False),
    "Eigen-CAM": ("eigencam", False, False),
    "Score-CAM": ("scorecam", False, False),
}


def blurred(images: torch.Tensor) -> torch.Tensor:
    """A strong Gaussian blur (sigma = 1/8 of the side): the insertion game's starting point."""
    side = images.shape[-1]
    sigma = side / 8
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


@torch.no_grad()
def auc_curves(model, images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image [N] for saliency maps [N, H, W]."""
    n, _, h, w = images.shape
    order = maps.reshape(n, -1).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))
    rank = rank.reshape(n, 1, h, w)
    start = blurred(images)
    deletion, insertion = [], []
    for k in range(STEPS + 1):
        shown = (rank < round(k / STEPS * h * w)).to(images.dtype)  # the k/STEPS most important pixels
        batch = torch.cat([images * (1 - shown), start * (1 - shown) + images * shown])
        probs = model(batch).softmax(dim=1)
        p = probs.gather(1, classes.repeat(2).unsqueeze(1))[:, 0]
        deletion.append(p[:n])
        insertion.append(p[n:])
    trapezoid = lambda c: ((torch.stack(c)[1:] + torch.stack(c)[:-1]) / 2).mean(dim=0).numpy()  # noqa: E731
    return trapezoid(deletion), trapezoid(insertion)


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--limit", type=int, default=60, help="validation images (first N)")
    parser.add_argument("--layer", help="default: the recommended layer")
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, info = load_model(args.checkpoint)
    dataset_name = (load_checkpoint(args.checkpoint).get("stage_config") or {}).get("dataset", "shapes-lt")
    layer = args.layer or recommended_layer(supported_layers(model, info.preprocessing.image_size))
    data = open_dataset(dataset_name, split="val", transform=info.preprocessing.eval_transform())
    step = max(1, len(data) // args.limit)  # spread over the classes
    images = torch.stack([data[i][0] for i in range(0, len(data), step)][: args.limit])
    print(f"{args.checkpoint}: {len(images)} validation images of {dataset_name}, layer {layer}, {STEPS} steps")
    rows = []
    with torch.no_grad():
        classes = model(images).argmax(dim=1)
    chunks = list(zip(images.split(args.batch), classes.split(args.batch)))
    random_maps = [torch.rand(x.shape[0], *x.shape[-2:]) for x, _ in chunks]
    for label, variant in [("random order (floor)", None), *VARIANTS.items()]:
        started = time.perf_counter()
        deletion, insertion = [], []
        for (x, c), noise in zip(chunks, random_maps):
            if variant is None:
                maps = noise
            else:
                method, aug, eigen = variant
                maps = explain(model, x, layer, c, methods=method, aug_smooth=aug,
                               eigen_smooth=eigen).maps[layer][method][:, 0]
            d, i = auc_curves(model, x, maps + 1e-6 * noise, c)  # noise breaks ties (flat regions) at random
            deletion.append(d)
            insertion.append(i)
        d, i = np.concatenate(deletion), np.concatenate(insertion)
        seconds = (time.perf_counter() - started) / len(images)
        rows.append((label, d.mean(), i.mean(), i.mean() - d.mean(), seconds))
        print(f"  {label:30} deletion {d.mean():.3f}  insertion {i.mean():.3f}  ({seconds * 1000:.0f} ms/image)",
              flush=True)
    print("\n| method | deletion AUC (lower is better) | insertion AUC (higher is better) | insertion - deletion | "
          "time per image (incl. the curves) |\n| --- | --- | --- | --- | --- |")
    for label, d, i, gap, seconds in rows:
        print(f"| {label} | {d:.3f} | {i:.3f} | {gap:+.3f} | {seconds * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
