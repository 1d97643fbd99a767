"""Grad-CAM without host syncs: explain() never reads a tensor's values on the host, and reads the model live.

On the CPU a TorchFunctionMode refuses every Python-level read of tensor values (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``, boolean-mask indexing, ...) while explain() runs: the same code path that, on a GPU, would
copy from the device and wait for it. Syncs hidden inside C++ kernels are out of its sight; the GPU-only test
checks those with ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from core.gradcam import GradCAMError, explain, gradcam

STAGES = ["layer1", "layer2", "layer3", "layer4"]
HOST_READS = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__array__, Tensor.__bool__, Tensor.__float__,
    Tensor.__int__, Tensor.__index__, Tensor.__complex__, Tensor.__repr__, Tensor.__format__, Tensor.nonzero,
    Tensor.unique, Tensor.masked_select, torch.nonzero, torch.unique, torch.masked_select, torch.equal,
    torch.allclose, torch.is_nonzero, torch._assert_async,
}


class HostReadError(AssertionError):
    """A tensor's values were read on the host."""


class NoHostReads(TorchFunctionMode):
    """Raise on every read of tensor values on the host (and on copies to the CPU device)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in HOST_READS or _masked_index(func, args) or _to_cpu(func, args, kwargs):
            raise HostReadError(f"host read of tensor values: {getattr(func, '__name__', func)}")
        return func(*args, **kwargs)


def _masked_index(func: object, args: tuple) -> bool:
    """Indexing by a boolean mask: the result's size depends on the values (a sync on a GPU)."""
    if func not in (Tensor.__getitem__, Tensor.__setitem__) or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)


def _to_cpu(func: object, args: tuple, kwargs: dict) -> bool:
    if func not in (Tensor.to, Tensor.copy_):
        return False
    places = [*args[1:], kwargs.get("device")]
    return any(str(p) == "cpu" for p in places if isinstance(p, (str, torch.device)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.mark.parametrize(
    "read",
    [
        lambda t: bool(t.sum() > 0), lambda t: t.sum().item(), lambda t: float(t.sum()), lambda t: t.tolist(),
        lambda t: t.cpu(), lambda t: t.to("cpu"), lambda t: torch.equal(t, t), lambda t: t[t > 0],
        lambda t: t.numpy(), lambda t: f"{t.sum()}", lambda t: int(t.argmax()), lambda t: t.nonzero(),
    ],
)
def test_the_guard_catches_host_reads(read):
    t = torch.randn(3, 4)
    with pytest.raises(HostReadError), NoHostReads():
        read(t)


CASES = {
    "gradcam at layer4": lambda m, x: gradcam(m, x, "layer4"),
    "top-5 classes at layer4": lambda m, x: explain(m, x, "layer4", top_k=5),
    "four stages at once": lambda m, x: explain(m, x, STAGES),
    "one class for all (int)": lambda m, x: explain(m, x, "layer4", 3),
    "a class per image (list)": lambda m, x: explain(m, x, "layer4", [i % 10 for i in range(len(x))]),
    "classes per image ([B, K] list)": lambda m, x: explain(m, x, "layer3", [[1, 2]] * len(x)),
    "a class per image (tensor)": lambda m, x: explain(m, x, "layer4", torch.arange(len(x)) % 10),
    "every gradient method, unnormalised": lambda m, x: explain(
        m, x, ["layer2", "layer4"], methods=["gradcam", "raw", "counterfactual", "gradcam++", "layercam"],
        normalised=False),
    "aug_smooth": lambda m, x: explain(m, x, "layer4", [2] * len(x), aug_smooth=True),
}


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_explain_reads_no_tensor_values_on_the_host(model, case, batch):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with NoHostReads():
        result = CASES[case](model, images)
    assert result is not None  # values are read only now, outside the guard
    maps = result if isinstance(result, Tensor) else next(iter(next(iter(result.maps.values())).values()))
    assert maps.shape[0] == batch and bool(torch.isfinite(maps).all())


def test_tensor_targets_out_of_range_give_nan_maps_not_a_host_read(model):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with NoHostReads():
        result = explain(model, images, ["layer3", "layer4"], torch.tensor([[4, 10], [-1, 2], [7, 1]]),
                         methods=["gradcam", "raw"])
    expected = explain(model, images, ["layer3", "layer4"], [[4, 9], [0, 2], [7, 1]], methods=["gradcam", "raw"])
    assert result.targets.tolist() == [[4, 10], [-1, 2], [7, 1]]
    bad = torch.tensor([[False, True], [True, False], [False, False]])
    for layer in ("layer3", "layer4"):
        for maps in (result.raw[layer], result.maps[layer]["gradcam"], result.maps[layer]["raw"]):
            assert bool(maps[bad].isnan().all()) and bool(maps[~bad].isfinite().all())
        torch.testing.assert_close(result.maps[layer]["gradcam"][~bad], expected.maps[layer]["gradcam"][~bad])


def test_python_targets_are_checked_before_they_become_tensors(model):
    images = torch.randn(2, 3, 32, 32)
    for targets, message in [([0, 10], "between 0 and 9"), (-1, "between 0 and 9"), ([[1, 2], [3]], "whole numbers"),
                             ([1, 2, 3], "one target class per image"), ("cat", "whole numbers")]:
        with pytest.raises(GradCAMError, match=message), NoHostReads():
            explain(model, images, "layer4", targets)


def test_changes_to_the_model_between_calls_are_seen(model):
    """Nothing per model is cached: a replaced, inserted or removed module is seen by the next call."""
    edited = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    explain(edited, images, "layer4")  # a first call, as a cache would have remembered it
    torch.manual_seed(6)
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    edited.layer4 = fresh.layer4.train()  # in training mode: must be explained in eval mode and left in training
    edited.layer3.insert(1, nn.BatchNorm2d(256).train())  # written into _modules directly, bypassing __setattr__
    with torch.no_grad():
        edited.layer3[1].running_mean.fill_(0.5)
    reference = copy.deepcopy(edited).eval()
    result = explain(edited, images, ["layer3.1", "layer4.1"])
    torch.testing.assert_close(result.raw["layer4.1"], explain(reference, images, "layer4.1").raw["layer4.1"])
    assert edited.layer4.training and all(m.training for m in edited.layer4.modules())
    assert edited.layer3[1].training and not edited.layer3[0].training
    del edited.layer3[1]
    with pytest.raises(GradCAMError, match="no layer named 'layer3.2'"):
        explain(edited, images, "layer3.2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: set_sync_debug_mode checks CUDA syncs")
@pytest.mark.parametrize("batch", [1, 16])
def test_explain_does_not_sync_with_the_gpu(model, batch, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # for the comparison with the CPU below
    device = torch.device("cuda")
    cuda_model = copy.deepcopy(model).to(device)
    images = torch.randn(batch, 3, 64, 64, device=device)
    cuda_model(images).sum().backward()  # warm-up (library handles), then no trace of it
    cuda_model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    results = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for case, run in CASES.items():
            results[case] = run(cuda_model, images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results["bf16 four stages"] = explain(cuda_model, images, STAGES, top_k=5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    on_gpu = results["four stages at once"]
    on_cpu = explain(model, images.cpu(), STAGES, on_gpu.targets.cpu())  # the same classes, whatever the top-1
    for layer in STAGES:
        torch.testing.assert_close(on_gpu.maps[layer]["gradcam"].cpu(), on_cpu.maps[layer]["gradcam"],
                                   atol=1e-2, rtol=1e-2)
    assert bool(torch.isfinite(results["bf16 four stages"].maps["layer1"]["gradcam"]).all())
