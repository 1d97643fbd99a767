"""The Grad-CAM engine against independent implementations, the analytic identity, and its safety rules."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from core.errors import UserError
from core.gradcam import (
    METHODS,
    GradCAMError,
    explain,
    gradcam,
    layers_by_stage,
    normalise,
    supported_layers,
    upsample,
)

# bn layers of Bottlenecks are overwritten in place (by ReLU(inplace) or by the residual +=)
IN_PLACE = ["bn1", "layer1.0.bn2", "layer2.1.bn1", "layer3.5.bn3", "layer4.2.bn3"]
OTHERS = ["layer4", "layer3", "layer2.0", "layer1.0.downsample.1", "layer3.1.conv2", "relu", "maxpool"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and a shared machine punishes oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def reference(resnet50: nn.Module) -> nn.Module:
    """A deep copy whose ReLUs are not in place, so a reference implementation cannot be fooled."""
    model = copy.deepcopy(resnet50)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


@pytest.fixture(scope="module")
def loud_pair(resnet50: nn.Module, reference: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Both models with the fc weights x1000: gradients large enough that pytorch-grad-cam's Grad-CAM++
    epsilon (1e-6 added to g^2-sized denominators) no longer distorts its result."""
    pair = copy.deepcopy(resnet50), copy.deepcopy(reference)
    for model in pair:
        with torch.no_grad():
            model.fc.weight.mul_(1000)
    return pair


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _activation(model: nn.Module, layer: str, x: torch.Tensor, clone: bool = True) -> torch.Tensor:
    """The layer's output as produced (clone) or as a library that keeps a reference sees it afterwards."""
    kept = []
    hook = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: kept.append(o.clone() if clone else o)
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return kept[0]


@pytest.mark.parametrize("layer", IN_PLACE + OTHERS)
def test_raw_map_matches_captum_before_normalisation(resnet50, reference, images, layer):
    from captum.attr import LayerGradCam

    targets = [3, 917]
    ours = explain(resnet50, images, layer, targets).raw[layer][:, 0]
    theirs = LayerGradCam(reference, dict(reference.named_modules())[layer]).attribute(
        images, target=targets, relu_attributions=False
    )[:, 0]
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 1e-4  # a real map, not two zero maps agreeing
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", ["layer1.0.bn2", "layer3.5.bn3"])
def test_in_place_trap_is_real_at_these_layers(resnet50, images, layer):
    """The kept reference differs from the activation as produced: the captum agreement above is meaningful."""
    naive = _activation(resnet50, layer, images, clone=False)
    true = _activation(resnet50, layer, images)
    assert (naive - true).abs().max() > 1e-2


def test_analytic_identity_at_layer4_of_resnet50(resnet50):
    """At layer4 (7x7 at 224 px) d logit_c / dA = fc.weight[c] / 49, so the raw map sums to logit_c - bias_c."""
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    result = explain(resnet50, image, "layer4", targets=[[5, 42, 999]])  # not just the top-1
    assert result.raw["layer4"].shape == (1, 3, 7, 7)
    activation = _activation(resnet50, "layer4", image)[0]
    for k, c in enumerate([5, 42, 999]):
        by_hand = torch.einsum("k,khw->hw", resnet50.fc.weight[c].detach() / 49, activation)
        torch.testing.assert_close(result.raw["layer4"][0, k], by_hand, rtol=1e-5, atol=1e-5)
        expected = result.logits[0, c] - resnet50.fc.bias[c]
        torch.testing.assert_close(result.raw["layer4"][0, k].sum(), expected.detach(), rtol=1e-5, atol=1e-4)


def test_gradcam_is_normalised_relu_of_raw_at_input_size(resnet50, images):
    maps = gradcam(resnet50, images, "layer3")
    raw = explain(resnet50, images, "layer3").raw["layer3"][:, 0]
    assert maps.shape == (2, 64, 64)
    assert maps.min() == 0 and torch.allclose(maps.amax(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(maps, normalise(upsample(raw.relu(), (64, 64))))


def test_default_target_is_top1(resnet50, images):
    with torch.no_grad():
        top1 = resnet50(images).argmax(dim=1)
    torch.testing.assert_close(gradcam(resnet50, images, "layer4"), gradcam(resnet50, images, "layer4", top1))
    result = explain(resnet50, images, "layer4", top_k=5)
    assert result.targets.shape == (2, 5) and torch.equal(result.targets[:, 0], top1)


def test_upsampling_is_bilinear_without_corner_alignment():
    low = torch.arange(4.0).reshape(1, 2, 2)
    expected = nn.functional.interpolate(low[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(upsample(low, (4, 4)), expected)
    assert upsample(low, (4, 4))[0, 0, 0] == 0.0  # corners replicate, they are not interpolated from outside


def test_constant_maps_normalise_to_zeros_never_nan():
    maps = torch.stack([torch.full((5, 5), 3.0), torch.zeros(5, 5), torch.arange(25.0).reshape(5, 5)])
    out = normalise(maps)
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros(5, 5)) and torch.equal(out[1], torch.zeros(5, 5))
    assert out[2].min() == 0 and out[2].max() == 1


def test_all_negative_raw_map_gives_zero_gradcam_not_nan(resnet50, images):
    result = explain(resnet50, images, "layer4", targets=[1, 1], methods=["gradcam", "counterfactual"])
    raw = result.raw["layer4"]
    for b in range(2):
        if raw[b, 0].max() <= 0:  # a class with no positive evidence anywhere
            assert torch.equal(result.maps["layer4"]["gradcam"][b, 0], torch.zeros(64, 64))
    assert not result.maps["layer4"]["gradcam"].isnan().any()


def test_several_layers_and_classes_in_one_pass_equal_separate_calls(resnet50, images):
    layers = ["layer4", "layer2.1.bn1", "layer1"]
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    together = explain(resnet50, images, layers, targets, methods=list(METHODS))
    for layer in layers:
        for k in (0, 2):
            alone = explain(resnet50, images, layer, targets[:, k], methods=list(METHODS))
            torch.testing.assert_close(together.raw[layer][:, k], alone.raw[layer][:, 0], rtol=1e-5, atol=1e-6)
            for method in METHODS:
                torch.testing.assert_close(
                    together.maps[layer][method][:, k], alone.maps[layer][method][:, 0], rtol=1e-4, atol=1e-5
                )


def test_batch_gives_the_same_map_per_image_as_single_images(resnet50):
    """Exact in float64 (in float32 convolution kernels for other batch sizes round differently)."""
    model = copy.deepcopy(resnet50).double()
    batch = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layers = ["layer4", "layer2.0.bn2"]
    together = explain(model, batch, layers, methods=list(METHODS))
    for b in range(3):
        alone = explain(model, batch[b : b + 1], layers, methods=list(METHODS))
        assert torch.equal(together.targets[b], alone.targets[0])
        for layer in layers:
            torch.testing.assert_close(together.raw[layer][b], alone.raw[layer][0], rtol=0, atol=1e-10)
            for method in METHODS:
                torch.testing.assert_close(
                    together.maps[layer][method][b], alone.maps[layer][method][0], rtol=0, atol=1e-9
                )


@pytest.mark.parametrize(("method", "library_class"), [("gradcam++", "GradCAMPlusPlus"), ("layercam", "LayerCAM")])
def test_methods_match_pytorch_grad_cam(loud_pair, images, method, library_class):
    """Grad-CAM++ and LayerCAM against pytorch-grad-cam (Grad-CAM itself is checked against captum above).

    pytorch-grad-cam normalises before resizing; re-normalising its output removes that difference."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ours_model, reference = loud_pair
    layer, targets = "layer3", [7, 300]
    cam = getattr(pytorch_grad_cam, library_class)(model=reference, target_layers=[getattr(reference, layer)])
    theirs = normalise(torch.from_numpy(cam(images, [ClassifierOutputTarget(t) for t in targets])))
    ours = explain(ours_model, images, layer, targets, methods=method).maps[layer][method][:, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)


def test_raw_and_counterfactual_maps(resnet50, images):
    result = explain(resnet50, images, "layer3", [2, 8], methods=["raw", "counterfactual"])
    raw = result.raw["layer3"]
    torch.testing.assert_close(result.maps["layer3"]["raw"], upsample(raw, (64, 64)))
    assert result.maps["layer3"]["raw"].min() < 0 < result.maps["layer3"]["raw"].max()  # signed, not normalised
    torch.testing.assert_close(result.maps["layer3"]["counterfactual"], normalise(upsample((-raw).relu(), (64, 64))))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_is_left_exactly_as_it_was():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(weights=None)
    model.train()
    model.layer2.eval()  # a mixed state must survive, not be flattened by model.train()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    before = _snapshot(model)
    grad_mode = torch.is_grad_enabled()
    batch = torch.randn(2, 3, 48, 48)
    first = explain(model, batch, ["layer1.0.bn1", "layer3", "layer4"], methods=list(METHODS))
    after = _snapshot(model)
    assert after["flags"] == before["flags"] and after["modes"] == before["modes"]
    for key, value in before["state"].items():  # weights and batch-norm running statistics untouched
        assert torch.equal(after["state"][key], value), key
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() == grad_mode and _hook_count(model) == 0
    second = explain(model, batch, ["layer1.0.bn1", "layer3", "layer4"])  # eval mode: deterministic
    torch.testing.assert_close(first.raw["layer3"], second.raw["layer3"])


def test_works_under_no_grad_and_inference_mode_and_restores_them(resnet50, images):
    expected = gradcam(resnet50, images, "layer4")
    with torch.no_grad():
        torch.testing.assert_close(gradcam(resnet50, images, "layer4"), expected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inside = gradcam(resnet50, images.clone(), "layer4")
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    torch.testing.assert_close(inside, expected)


@pytest.mark.parametrize(
    ("layer", "targets", "message"),
    [
        ("layer1.0.relu", None, "more than once"),  # raised inside the forward pass, by the hook
        ("layer4", [0, 5000], "between 0 and 999"),  # raised after the forward pass
        ("layer4", [1.5, 2], "whole numbers"),  # not silently class 1
        ("layer4", ["1", "2"], "whole numbers"),
        ("layer4", [float("nan"), 1], "whole numbers"),
        ("layer4", torch.tensor([1.5, 2.0]), "whole numbers"),  # a tensor too (its dtype says so: no host sync)
        ("nope", None, "no layer named"),
        ("fc", None, "spatial map"),
    ],
)
def test_errors_are_clear_and_leave_no_hooks(resnet50, images, layer, targets, message):
    resnet50.train()
    try:
        with pytest.raises(GradCAMError, match=message) as info:
            explain(resnet50, images, layer, targets)
        assert isinstance(info.value, UserError)
        assert _hook_count(resnet50) == 0 and torch.is_grad_enabled()
        assert all(m.training for m in resnet50.modules())
        assert all(p.grad is None for p in resnet50.parameters())
    finally:
        resnet50.eval()


def test_unknown_method_is_refused(resnet50, images):
    with pytest.raises(GradCAMError, match="Unknown method"):
        explain(resnet50, images, "layer4", methods="saliency")


def test_supported_layers_of_resnet50(resnet50):
    layers = supported_layers(resnet50, 224)
    by_name = {info.name: info for info in layers}
    stages = layers_by_stage(layers)
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    expected = {"layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14), "layer4": (2048, 7)}
    for name, (channels, size) in expected.items():
        info = by_name[name]
        assert (info.channels, info.height, info.width, info.kind, info.stage) == (channels, size, size, "stage", name)
        assert stages[name][-1] is info  # the stage output closes its group (forward order)
    assert by_name["conv1"].resolution == "112x112" and by_name["relu"].kind == "relu"
    assert by_name["layer3.5.bn3"].kind == "bn" and by_name["layer2.0.conv2"].kind == "conv"
    assert by_name["layer1.0"].kind == "block" and by_name["layer4.0.downsample"].kind == "downsample"
    assert not any(name.endswith(".relu") for name in by_name)  # the Bottleneck's shared relu runs 3 times
    assert "fc" not in by_name and "avgpool" not in by_name and "" not in by_name
    assert len(layers) == 4 + 16 * 7 + 4 * 3 + 4  # stem, 16 blocks x (3 conv + 3 bn + block), 4 downsamples
    assert _hook_count(resnet50) == 0 and not resnet50.training


def test_every_supported_layer_can_be_explained():
    torch.manual_seed(5)
    model = torchvision.models.resnet18(weights=None).eval()
    layers = [info.name for info in supported_layers(model, 32)]
    result = explain(model, torch.randn(1, 3, 32, 32), layers, methods=list(METHODS))
    for name in layers:
        for method in METHODS:
            assert result.maps[name][method].shape == (1, 1, 32, 32)
            assert not result.maps[name][method].isnan().any()


@pytest.mark.parametrize("size, expected", [(224, "layer4"), (64, "layer2"), (48, "layer2"), (32, "layer1")])
def test_recommended_layer_is_the_deepest_stage_with_a_fine_enough_map(size, expected):
    from core.gradcam import recommended_layer

    model = torchvision.models.resnet18(weights=None)
    assert recommended_layer(supported_layers(model, size)) == expected


# ---------------------------------------------------------------------------------------------------------
# Eigen-CAM, Score-CAM and the smoothing options against pytorch-grad-cam on the same model and layer


@pytest.fixture()
def oriented_projection(monkeypatch):
    """pytorch-grad-cam's own 2-D projection, with the sign our engine fixes (agreeing with the channel sum).

    An SVD's principal direction has an arbitrary sign (LAPACK decides); everything else stays the library's."""
    import numpy as np
    import pytorch_grad_cam.base_cam
    import pytorch_grad_cam.eigen_cam
    import pytorch_grad_cam.layer_cam
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    def oriented(batch):
        projection = get_2d_projection(batch)
        agree = (projection * np.nan_to_num(batch).sum(axis=1)).sum(axis=(1, 2))
        projection[agree < 0] *= -1
        return projection

    for module in (pytorch_grad_cam.base_cam, pytorch_grad_cam.eigen_cam, pytorch_grad_cam.layer_cam):
        if hasattr(module, "get_2d_projection"):
            monkeypatch.setattr(module, "get_2d_projection", oriented)


def _library(name: str, model: nn.Module, layer: str, images: torch.Tensor, targets: list[int], **options):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, name)(model=model, target_layers=[dict(model.named_modules())[layer]])
    if name == "ScoreCAM":
        cam.batch_size = 64
    return normalise(torch.from_numpy(cam(images, [ClassifierOutputTarget(t) for t in targets], **options)))


def test_eigencam_matches_pytorch_grad_cam(resnet50, reference, images, oriented_projection):
    ours = explain(resnet50, images, "layer3", [7, 300], methods="eigencam").maps["layer3"]["eigencam"][:, 0]
    theirs = _library("EigenCAM", reference, "layer3", images, [7, 300])
    assert theirs.amax() > 0.99 and theirs.std() > 0.05  # a real map
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)


@pytest.mark.parametrize(("method", "library_class"), [("gradcam", "GradCAM"), ("layercam", "LayerCAM")])
def test_eigen_smoothing_matches_pytorch_grad_cam(loud_pair, images, oriented_projection, method, library_class):
    ours_model, reference = loud_pair
    ours = explain(ours_model, images, "layer3", [7, 300], methods=method, eigen_smooth=True).maps["layer3"][method]
    theirs = _library(library_class, reference, "layer3", images, [7, 300], eigen_smooth=True)
    plain = explain(ours_model, images, "layer3", [7, 300], methods=method).maps["layer3"][method]
    assert (ours[:, 0] - plain[:, 0]).abs().max() > 0.05  # smoothing changes the map
    torch.testing.assert_close(ours[:, 0], theirs, rtol=0, atol=2e-3)


def test_aug_smoothing_matches_pytorch_grad_cam(loud_pair, images):
    ours_model, reference = loud_pair
    result = explain(ours_model, images, "layer3", [7, 300], methods=["gradcam", "gradcam++"], aug_smooth=True)
    for method, library_class in (("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus")):
        theirs = _library(library_class, reference, "layer3", images, [7, 300], aug_smooth=True)
        torch.testing.assert_close(result.maps["layer3"][method][:, 0], theirs, rtol=0, atol=2e-3)
    plain = explain(ours_model, images, "layer3", [7, 300])
    torch.testing.assert_close(result.logits, plain.logits, rtol=1e-3, atol=0.05)  # the unaugmented image's predictions and classes
    assert result.targets.tolist() == [[7], [300]]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(5)
    model = torchvision.models.resnet18(weights=None).eval()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def test_scorecam_matches_pytorch_grad_cam(resnet18, images):
    """Score-CAM is one forward pass per channel: one image and ResNet-18's layer3 (256 channels) keep this quick."""
    ours = explain(resnet18, images[:1], "layer3", [300], methods="scorecam").maps["layer3"]["scorecam"][:, 0]
    theirs = _library("ScoreCAM", resnet18, "layer3", images[:1], [300])
    assert theirs.std() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)


def test_scorecam_with_aug_smoothing_matches_pytorch_grad_cam(resnet18, images):
    small = images[:1, :, :32, :32]  # a forward per channel (128 in layer2) times each augmentation: kept small
    ours = explain(resnet18, small, "layer2", [300], methods="scorecam", aug_smooth=True).maps["layer2"]["scorecam"]
    theirs = _library("ScoreCAM", resnet18, "layer2", small, [300], aug_smooth=True)
    assert theirs.std() > 0.05
    torch.testing.assert_close(ours[:, 0], theirs, rtol=0, atol=2e-3)


def test_scorecam_and_smoothing_leave_the_model_as_it_was(resnet18, images):
    model = copy.deepcopy(resnet18).train()
    before = _snapshot(model)
    explain(model, images[:1, :, :32, :32], "layer3", methods="scorecam")
    explain(model, images, ["layer2", "layer3"], methods=["gradcam", "eigencam"], aug_smooth=True, eigen_smooth=True)
    after = _snapshot(model)
    assert after["modes"] == before["modes"] and _hook_count(model) == 0
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def test_unnormalised_maps_keep_their_magnitude(resnet50, images):
    """normalised=False: the same map before min-max scaling, so classes can share one scale."""
    result = explain(resnet50, images, "layer4", [[3, 917]] * 2, methods=["gradcam", "layercam"], normalised=False)
    for method in ("gradcam", "layercam"):
        maps = result.maps["layer4"][method]
        torch.testing.assert_close(normalise(maps), explain(resnet50, images, "layer4", [[3, 917]] * 2,
                                                            methods=method).maps["layer4"][method])
    torch.testing.assert_close(result.maps["layer4"]["gradcam"], upsample(result.raw["layer4"].relu(), (64, 64)))
