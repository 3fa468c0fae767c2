"""Conv + BatchNorm folding for inference (issue 16): every path that uses it gives the results it gave
unfolded, within float rounding (bf16 noise under a bf16 plan), and the module tree keeps its names."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import core.cams
from core.cams import CamExplainer
from core.models import MODEL_REGISTRY, build_model, cam_layer, fold_batch_norms, get_model_spec
from core.training.batches import TensorData
from core.training.loop import evaluate
from core.training.precision import ExecutionPlan


def trained_looking(name: str, seed: int = 0) -> nn.Module:
    """A registry model in eval mode whose BatchNorms hold statistics and affine weights far from a fresh
    layer's, so that folding them changes every folded convolution's weights. Seeded throughout: the weights
    must not depend on which tests ran before in the same process (a test order once drew a resnet50 whose
    saturated output made its HiResCAM map too ill-conditioned to compare)."""
    torch.manual_seed(seed)
    model, _ = build_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def batch_norm_count(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


# Each model's conv -> BatchNorm pairs: every BatchNorm of the ResNets and EfficientNet follows a convolution;
# DenseNet's are pre-activation (BN -> ReLU -> conv) except the stem's and each dense layer's second.
EXPECTED_PAIRS = {"resnet18": 20, "resnet50": 53, "densenet121": 59, "efficientnet_b0": 49, "hybrid_sresnet": 20}


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_folding_keeps_every_models_probabilities_and_layer_names(name):
    model = trained_looking(name)
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == EXPECTED_PAIRS[name]
    assert batch_norm_count(folded) == batch_norm_count(model) - EXPECTED_PAIRS[name]
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = torch.softmax(model(images), 1), torch.softmax(folded(images), 1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert {name for name, _ in folded.named_modules()} == {name for name, _ in model.named_modules()}
    spec = get_model_spec(name)
    for size in (64, 224):  # both CAM layers (the small-input stage and the last) are still found
        layer = cam_layer(spec, folded, size).module
        assert any(module is layer for module in folded.modules())


class SharedConvOutput(nn.Module):
    """A convolution whose output a BatchNorm reads and the residual reads too: folding the pair would hand
    the residual the normalised tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, images):
        features = self.conv(images)
        return self.head((self.norm(features) + features).mean((2, 3)))


def test_a_fold_that_would_change_the_output_is_undone():
    model = SharedConvOutput()
    model.norm.running_mean.fill_(0.5)
    model.norm.running_var.fill_(3.0)
    model.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        assert fold_batch_norms(model) == 0
        assert isinstance(model.norm, nn.BatchNorm2d) and type(model.conv) is nn.Conv2d
        assert torch.equal(model(images), expected)


def test_folding_refuses_a_model_in_training_mode():
    model, _ = build_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model.train())


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 0.02)])
def test_training_evaluation_with_folding_matches_it_without(precision, tolerance):
    """The engine's `evaluate` (validation each epoch, the test part at the end) under a plan that folds and
    one that does not; the caller's model keeps its BatchNorms."""
    model = trained_looking("resnet18", seed=2)
    generator = torch.Generator().manual_seed(3)
    data = TensorData(torch.randint(0, 256, (20, 3, 48, 48), dtype=torch.uint8, generator=generator),
                      torch.randint(0, 2, (20,), generator=generator))
    plans = [ExecutionPlan(torch.device("cpu"), precision, True, "requested", fold_batch_norms=fold)
             for fold in (False, True)]
    (plain, plain_loss), (folded, folded_loss) = (
        evaluate(model, data, plan, 8, nn.CrossEntropyLoss()) for plan in plans)
    assert np.abs(folded - plain).max() < tolerance
    assert abs(folded_loss - plain_loss) < tolerance
    assert batch_norm_count(model) == 20
    assert plans[1].describe()["evaluation_conv_bn_folded"] is True


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_b0"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_cams_on_the_folded_model_match_the_unfolded_ones(name, method, monkeypatch):
    model = trained_looking(name, seed=4)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    folded = CamExplainer(model, name, image_size=96)
    monkeypatch.setattr(core.cams, "fold_batch_norms", lambda model: 0)
    unfolded = CamExplainer(model, name, image_size=96)
    assert batch_norm_count(folded.model) < batch_norm_count(unfolded.model) == batch_norm_count(model)
    for image in images:
        expected, got = unfolded.explain(image[None], method), folded.explain(image[None], method)
        assert got.target_class == expected.target_class
        assert got.probability == pytest.approx(expected.probability, abs=1e-5)
        # The 96 px maps hook the stride-8 stage: their gradients pass through every folded layer above it, and
        # float32 rounding of the folded weights adds up to a few thousandths of the peak (a wrong fold: all of it).
        scale = float(np.abs(expected.cam).max()) or 1.0
        assert np.abs(got.cam - expected.cam).max() <= 5e-3 * scale
    np.testing.assert_allclose(folded.probabilities(images), unfolded.probabilities(images), atol=1e-5)
