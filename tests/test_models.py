
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv

import core.models
from core.models import (
    MODEL_REGISTRY,
    SMALL_INPUT_SIZE,
    HybridSResNet,
    build_model,
    cached_imagenet_path,
    cam_layer,
    default_cam_method,
    get_model_spec,
    pretrained_weights_available,
    small_input_note,
    weights_download_possible,
)
from tests.conftest import write_crafted_pickle


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_every_model_gives_two_logits_and_a_grad_cam_layer(name):
    model, weights = build_model(name, pretrained=False)
    assert weights == "random"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    target = get_model_spec(name).target_layer(model)
    assert any(module is target for module in model.modules())
    assert get_model_spec(name).display_name


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
@pytest.mark.parametrize("size", [64, 96, SMALL_INPUT_SIZE, 224])
def test_the_cam_layer_gives_the_map_size_it_names(name, size):
    """Below SMALL_INPUT_SIZE the maps hook a stride-8 stage; the registry's name, stride and map size agree with
    the module's actual output."""
    model, _ = build_model(name, pretrained=False)
    layer = cam_layer(get_model_spec(name), model.eval(), size)
    outputs = []
    handle = layer.module.register_forward_hook(lambda module, inputs, output: outputs.append(output.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    handle.remove()
    small = size < SMALL_INPUT_SIZE
    assert layer.stride == (8 if small else 32)
    assert layer.name == get_model_spec(name).layer_names[0 if not small else 1]
    assert tuple(outputs[0][2:]) == (layer.map_size, layer.map_size) == (-(-size // layer.stride),) * 2
    if not small:
        assert layer.module is get_model_spec(name).target_layer(model)


def test_small_inputs_start_from_hirescam_and_say_why():
    """The registry's metadata: below SMALL_INPUT_SIZE the maps hook the stride-8 stage with HiResCAM, from it on
    the last stage with the paper's Grad-CAM; the page's note names both."""
    assert default_cam_method(96) == "hirescam" and default_cam_method(SMALL_INPUT_SIZE) == "gradcam"
    assert default_cam_method(None) == "gradcam"
    note = small_input_note(96)
    assert "3×3" in note and "12×12" in note and "HiResCAM" in note
    assert small_input_note(224) == ""


def test_hybrid_sresnet_is_the_papers_architecture():
    model = HybridSResNet(dropout=0.3)
    assert isinstance(model.backbone, tv.ResNet) and isinstance(model.backbone.fc, nn.Identity)
    layers = list(model.head)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[3].out_features) == (512, 128, 2)
    assert layers[2].p == 0.3


def test_densenet_target_layer_is_a_separate_non_inplace_relu():
    model, _ = build_model("densenet121", pretrained=False)
    target = get_model_spec("densenet121").target_layer(model)
    assert isinstance(target, nn.ReLU) and not target.inplace


def test_offline_falls_back_to_random_with_one_warning(monkeypatch):
    monkeypatch.setattr(core.models, "_network_failed", False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tv.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_network)
    warnings = []
    model, weights = build_model("resnet18", pretrained=True, warn=warnings.append)
    assert weights == "random" and len(warnings) == 1 and "random initialisation" in warnings[0]
    assert core.models._network_failed, "later models do not try the network again"


@pytest.mark.parametrize("name", ["resnet18", "hybrid_sresnet", "densenet121", "efficientnet_b0"])
def test_imagenet_weights_come_from_torchvisions_cache(name):
    spec = get_model_spec(name)
    constructors = {"resnet18": tv.resnet18, "hybrid_sresnet": tv.resnet18, "densenet121": tv.densenet121,
                    "efficientnet_b0": tv.efficientnet_b0}
    imagenet_model = constructors[name](weights=None)  # 1000 classes, as the real checkpoint
    state = imagenet_model.state_dict()
    if name == "densenet121":  # the real file uses torchvision's old key names
        state = {k.replace("norm1", "norm.1").replace("conv1", "conv.1"): v for k, v in state.items()}
    cache = torch.hub.get_dir() + "/checkpoints"
    import os

    os.makedirs(cache, exist_ok=True)
    torch.save(state, os.path.join(cache, spec.imagenet_weights.url.rsplit("/", 1)[1]))
    model, weights = build_model(name, pretrained=True)
    assert weights == "imagenet"
    first_conv = next(p for p in imagenet_model.parameters())
    assert torch.equal(next(p for p in model.parameters()), first_conv)


def test_local_weights_file_and_refusal_of_code(tmp_path):
    trained, _ = build_model("resnet18", pretrained=False)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    model, weights = build_model("resnet18", weights_file=path)
    assert weights == "model.pt"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))

    crafted = tmp_path / "crafted.pt"
    write_crafted_pickle(crafted, tmp_path / "pwned")
    with pytest.raises(ValueError, match="not a plain PyTorch state_dict"):
        build_model("resnet18", weights_file=crafted)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="not found"):
        build_model("resnet18", weights_file=tmp_path / "missing.pt")


def test_damaged_cached_weights_fall_back_with_a_warning():
    import os

    spec = get_model_spec("resnet18")
    cache = torch.hub.get_dir() + "/checkpoints"
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, spec.imagenet_weights.url.rsplit("/", 1)[1]), "wb") as handle:
        handle.write(b"truncated download")
    warnings = []
    _, weights = build_model("resnet18", pretrained=True, warn=warnings.append)
    assert weights == "random" and "unreadable" in warnings[0]


def test_weights_availability_looks_at_torchvisions_cache_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("checking availability must not download")

    monkeypatch.setattr(tv.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_download)
    assert not any(pretrained_weights_available(name) for name in MODEL_REGISTRY), "the test's TORCH_HOME is empty"
    path = cached_imagenet_path(get_model_spec("resnet18"))
    assert path.parent == Path(torch.hub.get_dir()) / "checkpoints" and path.name.startswith("resnet18-")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    # The Hybrid S-ResNet's backbone loads ResNet18's ImageNet file.
    assert pretrained_weights_available("resnet18") and pretrained_weights_available("hybrid_sresnet")
    assert not pretrained_weights_available("resnet50")
    local = tmp_path / "resnet50-local.pt"
    local.write_bytes(b"")
    assert pretrained_weights_available("resnet50", weights_file=local)
    assert not pretrained_weights_available("resnet50", weights_file=tmp_path / "missing.pt")


def test_weights_download_check_sends_only_a_head_request(monkeypatch):
    import urllib.request

    requests = []

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def answering(request, timeout):
        requests.append(request.get_method())
        return Answer()

    def unreachable(request, timeout):
        requests.append(request.get_method())
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(core.models, "_network_failed", False)
    monkeypatch.setattr(urllib.request, "urlopen", answering)
    assert weights_download_possible()
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    assert not weights_download_possible()
    assert requests == ["HEAD", "HEAD"]
    monkeypatch.setattr(core.models, "_network_failed", True)
    assert not weights_download_possible(), "a failed download in this process settles it"
    assert len(requests) == 2
