"""Grad-CAM engine: exact class-activation maps at any layer, several layers and classes per forward pass.

Definitions (Selvaraju et al., ICCV 2017). For one image, a layer whose activation as produced is
``A`` (K x h x w) and the target class score ``y_c`` (the logit, before softmax)::

    alpha_k = mean_ij dy_c / dA_kij          (channel weights)
    L       = sum_k alpha_k A_k              (the raw map: signed, h x w)

Methods offered (``METHODS``):

- ``"gradcam"``: ReLU(L), the evidence *for* class c.
- ``"raw"``: L itself, signed and not normalised, for honest display on a fixed symmetric scale.
- ``"counterfactual"``: ReLU(-L), the regions whose activation speaks *against* class c.
- ``"gradcam++"`` (Chattopadhay et al., WACV 2018): channel weights
  ``w_k = sum_ij a_kij ReLU(g_kij)`` with ``a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3)`` (0 where g = 0),
  ``g`` the gradient of the logit (the closed form of the paper with the exponential's factor dropped, which
  only scales the map), then ReLU(sum_k w_k A_k). Weighs small, repeated objects more fairly.
- ``"layercam"`` (Jiang et al., IEEE TIP 2021): ReLU(sum_k ReLU(g_kij) A_kij), a per-position weighting
  that stays sharp and faithful at shallow layers where Grad-CAM's global average blurs.
- ``"eigencam"`` (Muhammad & Yeasin, IJCNN 2020): ReLU of the activations' projection on their first principal
  component (positions as samples, channels centred); gradient-free and the same for every class.
- ``"scorecam"`` (Wang et al., CVPRW 2020, in ``PERTURBATION_METHODS``): gradient-free; each channel, upsampled
  (bilinear, corners aligned) and min-max scaled, masks the input; the masked images' logits for class c,
  softmaxed over channels, weight the channels. One extra forward pass per channel: slow on a CPU at wide layers.

Options, as pytorch-grad-cam offers them (and tested against it):

- ``eigen_smooth``: instead of summing the weighted channels, project them on their first principal component
  (sign chosen to agree with the plain sum; an SVD's sign is otherwise arbitrary), which removes noise.
- ``aug_smooth``: the mean map over six test-time augmentations (horizontal flip x input scaled by 0.9, 1, 1.1),
  each map mapped back (flipped) first; the classes explained are those of the unaugmented image.
- ``normalised=False``: maps keep their magnitude (not min-max scaled), so classes and images can share a scale.

Every map except ``"raw"`` is upsampled to the input size with bilinear interpolation
(``align_corners=False``) and then min-max normalised per map to [0, 1] (a constant map becomes zeros).

How it stays exact and fast:

- The activation is captured *as produced* by a forward hook that hands a clone on to the rest of the
  network: torchvision's Bottleneck overwrites ``bn1``/``bn2``/``bn3`` outputs in place (ReLU(inplace) and the
  residual ``+=``), which would otherwise corrupt the stored activation.
- The forward pass runs under ``no_grad`` until the earliest chosen layer, whose hook detaches its output,
  marks it as requiring a gradient and turns grad mode on for the rest of the pass; ``torch.autograd.grad``
  then differentiates only back to the chosen activations (no parameter gradients, nothing written to
  ``.grad``). One forward pass serves every layer and class asked for; one backward pass serves all layers.
- The model runs in eval mode (batch-norm statistics frozen, so a batch gives the same map per image as one
  image alone); every module's train/eval flag, the grad mode and the hooks are restored in ``finally``.

No host syncs: ``explain`` never reads a tensor's values on the host (no ``.item()``, ``bool(t)``, ``.cpu()``,
``.tolist()``, boolean-mask indexing, ...), so on a GPU it only queues work until its caller reads the result.
Targets given as Python ints or sequences (or NumPy arrays) are checked in Python before they become tensors and
reach the device by a pinned, non-blocking copy. Targets given as a tensor are checked on the device: an
out-of-range class is never read back, it is clamped for the computation and its maps and raw maps are NaN.
``eigencam``/``eigen_smooth`` are the exception: ``torch.linalg.svd`` syncs with the CPU on CUDA.

Per-model work is cheap and read live, never cached: layers are found by walking ``_modules`` along the dotted
name, the module list for the train/eval flags comes from one walk of the live module tree, ``model.eval()``
runs only when some module is in training mode and only the flags that changed are written back.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.devices import to_device
from core.errors import UserError

METHODS: tuple[str, ...] = ("gradcam", "raw", "counterfactual", "gradcam++", "layercam", "eigencam")
PERTURBATION_METHODS: tuple[str, ...] = ("scorecam",)  # extra forward passes per channel
ALL_METHODS: tuple[str, ...] = METHODS + PERTURBATION_METHODS
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "raw": "Raw signed map",
    "counterfactual": "Counterfactual (against the class)",
    "gradcam++": "Grad-CAM++",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
    "scorecam": "Score-CAM",
}
SCORECAM_BATCH = 64  # masked images per forward pass
WHOLE_TARGETS = "Target classes must be whole numbers, one per image or several per image as [B, K]."


class GradCAMError(UserError, ValueError):
    """A layer, method or target that cannot be explained, said in one sentence."""


@dataclass(frozen=True)
class LayerInfo:
    """A layer the user may choose: its name in ``named_modules()``, stage, kind and map resolution."""

    name: str
    stage: str
    kind: str
    channels: int
    height: int
    width: int

    @property
    def resolution(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kind}, {self.resolution})"


@dataclass
class Explanation:
    """Everything one explained forward pass produced.

    ``targets`` is [B, K] (K classes per image, column 0 the first asked / top-1); ``raw[layer]`` holds the
    signed maps L at layer resolution [B, K, h, w]; ``maps[layer][method]`` the maps at input size
    [B, K, H, W] (in [0, 1], except ``"raw"`` which is signed and unnormalised).
    """

    logits: Tensor
    targets: Tensor
    raw: dict[str, Tensor] = field(default_factory=dict)
    maps: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def probabilities(self) -> Tensor:
        return self.logits.softmax(dim=1)


# ---------------------------------------------------------------------------------------------------------
# layers the user may choose


def _stage_of(name: str) -> str:
    head = name.split(".")[0]
    return head if head.startswith("layer") else "stem"


def _kind_of(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, (nn.ReLU, nn.MaxPool2d)):
        return type(module).__name__.lower()
    if "." not in name and name.startswith("layer"):
        return "stage"
    if name.endswith("downsample"):
        return "downsample"
    return "block"


def supported_layers(model: nn.Module, image_size: int = 224) -> list[LayerInfo]:
    """Every module whose output is one spatial map per forward pass, in forward order, grouped by stage.

    Found by one ``no_grad`` eval-mode forward pass of a blank image of ``image_size``: a module qualifies when
    it runs exactly once and returns a 4-D tensor larger than 1x1. Modules called several times (the
    Bottleneck's shared ``relu``) and the model itself are left out.
    """
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
            shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else ()

        return hook

    modules = dict(model.named_modules())
    parameter = next(model.parameters())
    with _preserved(model), _hooks((modules[n], recorder(n)) for n in modules if n):
        torch.set_grad_enabled(False)
        model(parameter.new_zeros(1, 3, image_size, image_size))
    return [
        LayerInfo(n, _stage_of(n), _kind_of(n, modules[n]), shapes[n][1], shapes[n][2], shapes[n][3])
        for n in order
        if calls[n] == 1 and len(shapes[n]) == 4 and shapes[n][2] * shapes[n][3] > 1
    ]


def layers_by_stage(layers: Sequence[LayerInfo]) -> dict[str, list[LayerInfo]]:
    """Group ``supported_layers()`` by stage (``stem``, ``layer1`` ... ``layer4``), keeping forward order."""
    groups: dict[str, list[LayerInfo]] = {}
    for info in layers:
        groups.setdefault(info.stage, []).append(info)
    return groups


STAGES = ("layer1", "layer2", "layer3", "layer4")
MIN_SIDE = 6  # a map coarser than this cannot point inside a typical object box


def recommended_layer(layers: Sequence[LayerInfo]) -> str:
    """The deepest whole stage whose map is at least MIN_SIDE on each side (``layer4`` at 224 px,
    ``layer2`` at 48-64 px: see BENCHMARKS.md, pointing game); the sharpest stage when none is."""
    stages = [info for info in layers if info.name in STAGES]
    if not stages:
        raise GradCAMError("This model has no ResNet stages (layer1..layer4) to explain.")
    fine = [info for info in stages if min(info.height, info.width) >= MIN_SIDE]
    return (fine or stages[:1])[-1].name


# ---------------------------------------------------------------------------------------------------------
# state restoration and hooks


def _module_tree(module: nn.Module, found: list[nn.Module] | None = None) -> list[nn.Module]:
    """The module and all its descendants, read from the live tree (a walk of ``_modules``, no names built)."""
    found = [] if found is None else found
    found.append(module)
    for child in module._modules.values():
        if child is not None:
            _module_tree(child, found)
    return found


def _layer(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule at the dotted ``name`` (as ``named_modules()`` spells it), or None."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode and the caller's grad mode for the duration; every module's own flag restored after."""
    modules = _module_tree(model)
    modes = [m.training for m in modules]
    grad_mode = torch.is_grad_enabled()
    if any(modes):
        model.eval()
    try:
        with torch.inference_mode(False):
            yield
    finally:
        torch.set_grad_enabled(grad_mode)
        for module, mode in zip(modules, modes):
            if module.training != mode:  # writing a flag costs a Module.__setattr__: only the changed ones
                module.training = mode


@contextmanager
def _hooks(pairs: Iterator[tuple[nn.Module, object]]) -> Iterator[None]:
    """Register forward hooks and remove every one of them on the way out, exceptions included."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Capture:
    """Forward hooks that keep each chosen layer's activation as produced and start autograd at the first."""

    def __init__(self) -> None:
        self.activations: dict[str, Tensor] = {}

    def hook(self, name: str):
        def capture(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise GradCAMError(f"Layer '{name}' does not output a spatial map, so it cannot be explained.")
            if name in self.activations:
                raise GradCAMError(
                    f"Layer '{name}' runs more than once per forward pass, so it has no single activation; "
                    "choose one of supported_layers() instead."
                )
            if not (torch.is_grad_enabled() and output.requires_grad):
                output = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            self.activations[name] = output
            return output.clone()  # later in-place ops modify the clone, never the captured activation

        return capture


# ---------------------------------------------------------------------------------------------------------
# the engine


def explain(
    model: nn.Module,
    images: Tensor,
    layers: str | Sequence[str],
    targets: int | Sequence[int] | Tensor | None = None,
    *,
    top_k: int = 1,
    methods: str | Sequence[str] = ("gradcam",),
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    normalised: bool = True,
) -> Explanation:
    """Maps for several layers x classes x methods from ONE forward pass and one backward pass per class.

    ``images`` is a normalised float batch [B, 3, H, W]; ``layers`` module names as ``named_modules()`` spells
    them; ``targets`` a class per image ([B]), several per image ([B, K]), one class for all, or None for the
    ``top_k`` highest logits of each image. ``eigen_smooth``, ``aug_smooth`` and ``normalised``: see the module
    docstring. Reads no tensor on the host: Python targets out of range raise ``GradCAMError``; a tensor's give
    NaN maps for those classes.
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    methods = [methods] if isinstance(methods, str) else list(methods)
    modules = _check_request(model, layers, methods)
    if aug_smooth:
        return _aug_smoothed(model, images, layers, targets, top_k, methods, eigen_smooth, normalised)
    capture = _Capture()
    with _preserved(model), _hooks((module, capture.hook(n)) for n, module in zip(layers, modules)):
        torch.set_grad_enabled(False)
        logits = model(images)
        missing = [n for n in layers if n not in capture.activations]
        if missing:
            raise GradCAMError(f"Layer '{missing[0]}' did not run in the model's forward pass.")
        chosen, valid = _resolve_targets(logits, targets, top_k)
        index = chosen if valid is None else chosen.clamp(0, logits.shape[1] - 1)
        gradients = _gradients(logits, index, [capture.activations[n] for n in layers])
    result = Explanation(logits=logits.detach(), targets=chosen)
    size = tuple(images.shape[-2:])
    for name, grads in zip(layers, gradients):
        acts = capture.activations[name].detach().unsqueeze(1)  # [B, 1, C, h, w]
        raw = _weighted(acts, grads.mean(dim=(-2, -1)))
        scores = _score_weights(model, images, acts[:, 0], index) if "scorecam" in methods else None
        maps = {m: _method_map(m, acts, grads, raw, scores, size, eigen_smooth, normalised) for m in methods}
        result.raw[name] = _blanked(raw, valid)
        result.maps[name] = {m: _blanked(v, valid) for m, v in maps.items()}
    return result


def gradcam(
    model: nn.Module, images: Tensor, layer: str, targets: int | Sequence[int] | Tensor | None = None
) -> Tensor:
    """Normalised Grad-CAM maps [B, H, W] at input size for one layer; ``targets`` None means the top-1 class."""
    return explain(model, images, layer, targets).maps[layer]["gradcam"][:, 0]


def _check_request(model: nn.Module, layers: list[str], methods: list[str]) -> list[nn.Module]:
    """The modules of the asked layers, after checking the request (one sentence per mistake)."""
    if not layers:
        raise GradCAMError("Choose at least one layer to explain.")
    modules = [_layer(model, name) if name else None for name in layers]
    for name, module in zip(layers, modules):
        if module is None:
            raise GradCAMError(f"The model has no layer named '{name}'; choose one of supported_layers().")
    for method in methods:
        if method not in ALL_METHODS:
            raise GradCAMError(f"Unknown method '{method}'; choose one of {', '.join(ALL_METHODS)}.")
    if len(set(layers)) != len(layers):
        raise GradCAMError("Each layer can be asked for only once per explanation.")
    return modules


def _resolve_targets(logits: Tensor, targets: int | Sequence[int] | Tensor | None,
                     top_k: int) -> tuple[Tensor, Tensor | None]:
    """The [B, K] class indices to explain on the logits' device, without reading any tensor on the host.

    Python targets are checked here (clear error); a tensor's are checked on the device: the second value is
    then the [B, K] flag of the classes in range, else None (every class known to be in range).
    """
    batch, classes = logits.shape
    if targets is None:
        if not 1 <= top_k <= classes:
            raise GradCAMError(f"top_k must be between 1 and {classes}, the number of classes.")
        return logits.detach().topk(top_k, dim=1).indices, None
    if isinstance(targets, Tensor):
        if targets.is_floating_point() or targets.is_complex():  # the dtype alone: no host sync
            raise GradCAMError(WHOLE_TARGETS)
        chosen = _per_image(to_device(targets.long(), logits.device), batch)
        return chosen, (chosen >= 0) & (chosen < classes)
    try:
        given = np.asarray(targets)
    except (TypeError, ValueError) as error:
        raise GradCAMError(WHOLE_TARGETS) from error
    if given.dtype.kind not in "iuf" or not np.isfinite(given).all() or not (given == np.round(given)).all():
        raise GradCAMError(WHOLE_TARGETS)  # 1.5 is not class 1
    array = given.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= classes):
        raise GradCAMError(f"Target classes must be between 0 and {classes - 1}.")
    return _per_image(to_device(torch.from_numpy(array), logits.device), batch), None


def _per_image(chosen: Tensor, batch: int) -> Tensor:
    """Targets shaped [B, K] (a single class for all images, one per image, or several per image)."""
    if chosen.dim() == 0:
        chosen = chosen.expand(batch)
    if chosen.dim() == 1:
        chosen = chosen.unsqueeze(1)
    if chosen.dim() != 2 or chosen.shape[0] != batch:
        raise GradCAMError(f"Give one target class per image ({batch} images), or several per image as [B, K].")
    return chosen


def _blanked(maps: Tensor, valid: Tensor | None) -> Tensor:
    """Maps [B, K, ...] with NaN wherever ``valid`` [B, K] says the target class was out of range."""
    if valid is None:
        return maps
    return torch.where(valid.view(*valid.shape, *[1] * (maps.dim() - 2)), maps, torch.nan)


def _gradients(logits: Tensor, targets: Tensor, activations: list[Tensor]) -> list[Tensor]:
    """d logit[b, targets[b, k]] / d activation, stacked as [B, K, C, h, w] per layer.

    Images are independent in eval mode, so the sum over the batch of the chosen logits has, at each image's
    activation, exactly that image's gradient. Classes are taken one backward pass each over one kept graph.
    """
    per_class: list[list[Tensor]] = []
    for k in range(targets.shape[1]):
        score = logits.gather(1, targets[:, k : k + 1]).sum()
        grads = torch.autograd.grad(
            score, activations, retain_graph=k + 1 < targets.shape[1], allow_unused=True
        )
        per_class.append([torch.zeros_like(a) if g is None else g for g, a in zip(grads, activations)])
    return [torch.stack([grads[i] for grads in per_class], dim=1) for i in range(len(activations))]


def _weighted(acts: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[..., k] A_k: [B, 1|K, C, h, w] x [B, K, C] -> [B, K, h, w]."""
    return (weights[..., None, None] * acts).sum(dim=2)


def _method_map(method: str, acts: Tensor, grads: Tensor, raw: Tensor, scores: Tensor | None,
                size: tuple[int, int], eigen_smooth: bool, normalised: bool) -> Tensor:
    """One method's maps [B, K, H, W] at input size from activations [B, 1, C, h, w] and gradients."""
    if method == "eigencam":
        low = _principal_projection(acts).expand(-1, grads.shape[1], -1, -1).relu()
    else:
        if eigen_smooth:
            low = _principal_projection(_channel_terms(method, acts, grads, scores))  # [B, K, h, w]
        elif method in ("gradcam", "raw", "counterfactual"):
            low = raw
        else:
            low = _channel_terms(method, acts, grads, scores).sum(dim=2)
        if method == "raw":
            return upsample(low, size)
        low = (-low).relu() if method == "counterfactual" else low.relu()
    maps = upsample(low, size)
    return normalise(maps) if normalised else maps


def _channel_terms(method: str, acts: Tensor, grads: Tensor, scores: Tensor | None) -> Tensor:
    """The per-channel contributions a method sums (or eigen smoothing projects): [B, K, C, h, w]."""
    if method == "layercam":
        return grads.relu() * acts
    if method == "gradcam++":
        weights = _gradcam_plus_plus_weights(acts, grads)
    elif method == "scorecam":
        weights = scores
    else:  # gradcam, raw, counterfactual
        weights = grads.mean(dim=(-2, -1))
    return weights[..., None, None] * acts


def _principal_projection(terms: Tensor) -> Tensor:
    """[..., C, h, w] -> [..., h, w]: each position's channel vector (centred over positions) projected on the
    first principal direction, signed so that it agrees with the plain channel sum."""
    flat = terms.flatten(-2).transpose(-1, -2)  # [..., hw, C]
    centred = flat - flat.mean(dim=-2, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[..., 0, :]  # [..., C]
    projection = (centred @ direction.unsqueeze(-1)).squeeze(-1)  # [..., hw]
    agreement = (projection * flat.sum(dim=-1)).sum(dim=-1, keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection)
    return projection.reshape(*terms.shape[:-3], *terms.shape[-2:])


def _score_weights(model: nn.Module, images: Tensor, acts: Tensor, targets: Tensor) -> Tensor:
    """Score-CAM channel weights [B, K, C]: softmax over channels of the target logits of the input masked by
    each channel (upsampled with aligned corners, min-max scaled with a 1e-8 guard)."""
    masks = F.interpolate(acts, size=images.shape[-2:], mode="bilinear", align_corners=True)  # [B, C, H, W]
    low = masks.amin(dim=(-2, -1), keepdim=True)
    masks = (masks - low) / (masks.amax(dim=(-2, -1), keepdim=True) - low + 1e-8)
    weights = []
    with _preserved(model):
        torch.set_grad_enabled(False)
        for b in range(images.shape[0]):
            masked = images[b].unsqueeze(0) * masks[b].unsqueeze(1)  # [C, 3, H, W]
            logits = torch.cat([model(chunk) for chunk in masked.split(SCORECAM_BATCH)])  # [C, classes]
            weights.append(logits[:, targets[b]].transpose(0, 1).softmax(dim=-1))  # [K, C]
    return torch.stack(weights)


AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


def _aug_smoothed(model: nn.Module, images: Tensor, layers: list[str], targets: int | Sequence[int] | Tensor | None,
                  top_k: int, methods: list[str], eigen_smooth: bool, normalised: bool) -> Explanation:
    """The mean over ``AUGMENTATIONS`` of each map (flipped back), from one forward pass of all of them."""
    with _preserved(model):
        torch.set_grad_enabled(False)
        chosen, _ = _resolve_targets(model(images), targets, top_k)  # [B, K], of the unaugmented images
    batch = torch.cat([(images.flip(-1) if flip else images) * factor for flip, factor in AUGMENTATIONS])
    every = explain(model, batch, layers, chosen.repeat(len(AUGMENTATIONS), 1), methods=methods,
                    eigen_smooth=eigen_smooth, normalised=normalised)
    n, plain = images.shape[0], AUGMENTATIONS.index((False, 1.0))
    own = slice(plain * n, (plain + 1) * n)
    result = Explanation(logits=every.logits[own], targets=every.targets[own])
    for layer in layers:
        result.raw[layer] = every.raw[layer][own]
        result.maps[layer] = {}
        for method, maps in every.maps[layer].items():
            parts = [part.flip(-1) if flip else part for part, (flip, _) in zip(maps.split(n), AUGMENTATIONS)]
            mean = torch.stack(parts).mean(dim=0)
            result.maps[layer][method] = normalise(mean) if normalised and method != "raw" else mean
    return result


def _gradcam_plus_plus_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ channel weights [B, K, C] from activations and first-order logit gradients."""
    g2 = grads.pow(2)
    denominator = 2 * g2 + acts.sum(dim=(-2, -1), keepdim=True) * g2 * grads
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1), 0)
    return (alpha * grads.relu()).sum(dim=(-2, -1))


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of maps [..., h, w] to ``size``."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def normalise(maps: Tensor) -> Tensor:
    """Min-max each map [..., H, W] to [0, 1]; a constant map becomes all zeros (never NaN)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0)
