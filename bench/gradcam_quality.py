"""Grad-CAM quality on the demo model: pointing game on images with known boxes, and the Adebayo sanity check.

- Pointing game (Zhang et al., 2016, strict: no tolerance margin): on the correctly classified validation
  images of the synthetic ``shapes-lt`` set, the map of the true class is mapped back onto the original image
  (crop geometry of the checkpoint's preprocessing) and its maximum must fall inside the object's box. Ties
  (a plateau) are resolved by the plateau's centroid. Reported for each layer asked for.
- Sanity check (Adebayo et al., NeurIPS 2018, model-parameter randomisation): the trained weights are
  re-initialised, cascading from the top (fc, then layer4 ... down to the stem) and all at once, and the
  Spearman rank correlation of each image's map with the trained model's map is averaged. A map that
  explains the model must change: correlation well below 0.5.

    nice python bench/gradcam_quality.py --checkpoint PATH [--layers layer2,layer3,layer4] [--methods gradcam,layercam]
        [--layer layer4 --method gradcam]   (the recommended pair: sanity check)
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.checkpoints import load_model  # noqa: E402
from core.datasets import open_dataset  # noqa: E402
from core.gradcam import explain  # noqa: E402
from core.overlay import cam_on_original  # noqa: E402

CASCADE = [("fc", ["fc"]), ("layer4", ["layer4"]), ("layer3", ["layer3"]), ("layer2", ["layer2"]),
           ("layer1", ["layer1"]), ("stem", ["conv1", "bn1"])]


def correct_items(model: nn.Module, dataset, transform, limit: int, batch: int = 32) -> list[tuple[int, torch.Tensor]]:
    """(index, input) of the first ``limit`` validation images the model classifies correctly."""
    kept: list[tuple[int, torch.Tensor]] = []
    for start in range(0, len(dataset), batch):
        indices = list(range(start, min(start + batch, len(dataset))))
        inputs = torch.stack([transform(dataset.load_raw(i)) for i in indices])
        with torch.no_grad():
            predicted = model(inputs).argmax(dim=1)
        kept += [(i, x) for i, x, p in zip(indices, inputs, predicted) if int(p) == dataset.targets[i]]
        if len(kept) >= limit:
            break
    return kept[:limit]


def maps_of(model: nn.Module, items, targets: list[int], layers: list[str], methods: list[str],
            batch: int = 32) -> dict[tuple[str, str], torch.Tensor]:
    """Input-size maps [N, H, W] per (layer, method) for the items and target classes (one forward per batch)."""
    parts: dict[tuple[str, str], list[torch.Tensor]] = {(l, m): [] for l in layers for m in methods}
    for start in range(0, len(items), batch):
        inputs = torch.stack([x for _, x in items[start : start + batch]])
        result = explain(model, inputs, layers, targets[start : start + batch], methods=methods)
        for layer, method in parts:
            parts[layer, method].append(result.maps[layer][method][:, 0])
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


def pointing_hit(cam: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], preprocessing) -> bool:
    """Does the map's maximum, on the original image, fall inside the box (x0, y0, x1, y1), x1/y1 exclusive?

    A constant map (no evidence anywhere) is a miss."""
    if cam.max() == cam.min():
        return False  # a constant map points nowhere
    values, inside = cam_on_original(cam, size, preprocessing)
    values = np.where(inside, values, -np.inf)
    ys, xs = np.nonzero(values >= values.max() - 1e-6)
    x, y = xs.mean(), ys.mean()
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def reinitialised(model: nn.Module, names: list[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose named submodules get fresh (default) initial weights."""
    torch.manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        for module in modules[name].modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return model


def mean_spearman(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, int]:
    """Mean Spearman rank correlation per image, over images whose reference map is not constant.

    A constant map of the re-initialised model (no evidence anywhere) has no rank order: it counts as 0, and
    how many did is returned with the mean.
    """
    values, constant = [], 0
    for a, b in zip(reference.flatten(1).numpy(), other.flatten(1).numpy()):
        if a.std() == 0:
            continue
        constant += int(b.std() == 0)
        values.append(0.0 if b.std() == 0 else float(spearmanr(a, b).statistic))
    return float(np.mean(values)) if values else float("nan"), constant


def sanity_check(model: nn.Module, items, targets, layer: str, method: str, trained: torch.Tensor) -> None:
    informative = int((trained.flatten(1).std(dim=1) > 0).sum())
    print(f"\nSanity check (Adebayo et al. 2018) at {layer}, {method}: mean Spearman rank correlation with the "
          f"trained model's maps ({informative} images whose trained map is not constant)")
    cascade = copy.deepcopy(model)
    for step, names in CASCADE:
        reinitialised(cascade, names)
        rho, undefined = mean_spearman(trained, maps_of(cascade, items, targets, [layer], [method])[layer, method])
        print(f"  cascading, re-initialised down to {step:7s}: {rho:+.3f}" + _undefined(undefined))
    everything = reinitialised(copy.deepcopy(model), [""])
    rho, undefined = mean_spearman(trained, maps_of(everything, items, targets, [layer], [method])[layer, method])
    print(f"  all weights re-initialised at once         : {rho:+.3f}" + _undefined(undefined))


def _undefined(count: int) -> str:
    return f"  ({count} re-initialised maps constant, counted as 0)" if count else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the demo model (python -m train run train/configs/demo.yaml)")
    parser.add_argument("--dataset", default="shapes-lt")
    parser.add_argument("--layers", default="layer2,layer3,layer4", help="layers for the pointing game")
    parser.add_argument("--layer", default="layer4", help="the recommended layer: sanity check")
    parser.add_argument("--methods", default="gradcam,layercam", help="methods for the pointing game")
    parser.add_argument("--method", default="gradcam", help="the recommended method: sanity check")
    parser.add_argument("--limit", type=int, default=200, help="at most this many correctly classified images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, info = load_model(args.checkpoint)
    dataset = open_dataset(args.dataset, split="val")
    pre = info.preprocessing
    items = correct_items(model, dataset, pre.eval_transform(), args.limit)
    targets = [dataset.targets[i] for i, _ in items]
    layers = sorted(set(args.layers.split(",")) | {args.layer})
    print(f"{args.checkpoint}: {info.arch}, input {pre.image_size}px; {args.dataset} val: {len(dataset)} images, "
          f"{len(items)} correctly classified used")
    methods = list(dict.fromkeys(args.methods.split(",") + [args.method]))
    maps = maps_of(model, items, targets, layers, methods)
    boxes = dataset.boxes
    print("Pointing game (map maximum inside the object's box, strict), correctly classified images:")
    for (layer, method), layer_maps in maps.items():
        hits = [pointing_hit(m.numpy(), dataset.load_raw(i).size, boxes[i], pre)
                for m, (i, _) in zip(layer_maps, items)]
        print(f"  {layer:8s} {method:10s}: {np.mean(hits):6.1%}  ({sum(hits)}/{len(hits)})")
    sanity_check(model, items, targets, args.layer, args.method, maps[args.layer, args.method])

if __name__ == "__main__":
    main()
