"""The one model registry: name -> builder, Grad-CAM target layers, display name, ImageNet weights.

Nothing else in the project builds models. ImageNet weights come through torchvision's weights API
and its cache (torch.hub); without a network they fall back to random initialisation with one
warning, and the run records which weights it started from.
"""

from __future__ import annotations

import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

NUM_CLASSES = 2
# Below this input size the last stage's map (stride 32) is 3 x 3 or smaller: each cell covers a ninth of the
# image and sees all of it, so its maps cannot point at a lesion. CAMs then hook a stride-8 stage (12 x 12 at
# 96 px) with HiResCAM, which multiplies each activation by its own gradient instead of a channel's mean
# gradient (Draelos & Carin, 2020), so the map keeps the stage's resolution. On the demo it finds lesions
# placed anywhere where Grad-CAM on the same stage, or one stage deeper, does not, and unlike LayerCAM there
# it passes the randomisation sanity check; docs/PERFORMANCE.md has the measurements per model, layer and method.
SMALL_INPUT_SIZE = 128
SMALL_INPUT_STRIDE = 8
SMALL_INPUT_METHOD = "hirescam"
PAPER_METHOD = "gradcam"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    display_name: str
    build: Callable[[float], nn.Module]  # dropout -> a randomly initialised two-class model
    target_layer: Callable[[nn.Module], nn.Module]  # the layer CAMs hook: the last stage (stride 32)
    imagenet_weights: tv.WeightsEnum
    load_imagenet: Callable[[nn.Module, dict], None]  # puts an ImageNet state_dict into the model
    # The model's parameterised parts from the output down (head, last stage, ..., stem), each named:
    # the order in which the audit's cascading randomisation re-initialises them.
    parameter_stages: Callable[[nn.Module], list[tuple[str, list[nn.Module]]]]
    # The stride-8 stage CAMs hook for inputs under SMALL_INPUT_SIZE.
    small_input_layer: Callable[[nn.Module], nn.Module]
    # How a reader finds the two layers in the model's code: (target_layer, small_input_layer).
    layer_names: tuple[str, str]


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    MODEL_REGISTRY[spec.name] = spec
    return spec


@dataclass(frozen=True)
class CamLayer:
    """The layer a model's CAMs hook for one input size, and how the page names it."""

    module: nn.Module
    name: str  # e.g. "layer3"
    stride: int  # input pixels per map pixel
    map_size: int  # the map's side at this input size

    def describe(self) -> str:
        return f"{self.name}, {self.map_size}×{self.map_size}" if self.map_size else self.name


def uses_small_input_layer(image_size: int | None) -> bool:
    return image_size is not None and image_size < SMALL_INPUT_SIZE


def cam_layer_name(spec: ModelSpec, image_size: int | None = None) -> str:
    """The name of the layer CAMs hook for inputs of `image_size` px (see `cam_layer`)."""
    return spec.layer_names[1] if uses_small_input_layer(image_size) else spec.layer_names[0]


def default_cam_method(image_size: int | None) -> str:
    """The CAM method the pages start from for a model trained at `image_size` px: the paper's Grad-CAM,
    or HiResCAM below SMALL_INPUT_SIZE (where the maps hook the stride-8 stage)."""
    return SMALL_INPUT_METHOD if uses_small_input_layer(image_size) else PAPER_METHOD


def small_input_note(image_size: int) -> str:
    """Why the maps of a model trained at `image_size` px hook the stride-8 stage with HiResCAM ('' when not)."""
    if not uses_small_input_layer(image_size):
        return ""
    last, early = -(-image_size // 32), -(-image_size // SMALL_INPUT_STRIDE)
    return (f"At {image_size} px the last stage's map is only {last}×{last}: each cell sees the whole image, so it "
            f"cannot point at a lesion. Below {SMALL_INPUT_SIZE} px the maps hook an earlier stage ({early}×{early}) "
            f"and start from HiResCAM, which multiplies each activation by its own gradient and so keeps that "
            f"resolution; from {SMALL_INPUT_SIZE} px on, Grad-CAM on the last stage, as in the paper.")


def cam_layer(spec: ModelSpec, model: nn.Module, image_size: int | None = None) -> CamLayer:
    """The layer CAMs of `model` hook for inputs of `image_size` px: the last stage, or the registry's earlier
    stage below SMALL_INPUT_SIZE (None: the last stage, whatever the size)."""
    name = cam_layer_name(spec, image_size)
    if uses_small_input_layer(image_size):
        return CamLayer(spec.small_input_layer(model), name, SMALL_INPUT_STRIDE, -(-image_size // SMALL_INPUT_STRIDE))
    return CamLayer(spec.target_layer(model), name, 32, -(-image_size // 32) if image_size is not None else 0)


def named_cam_layer(model: nn.Module, name: str) -> CamLayer:
    """Any module of the model as the CAMs' layer, by its name ("layer2", "features.3"); ValueError when the
    model has none of that name. Its stride and map size are not known without a forward pass: left 0."""
    try:
        return CamLayer(model.get_submodule(name), name, 0, 0)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no layer {name!r}") from None


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODEL_REGISTRY)})") from None


class HybridSResNet(nn.Module):
    """The paper's network: ResNet18 without its fc, global average pooling, then
    Linear 512->128, ReLU, Dropout(p), Linear 128->2."""

    def __init__(self, dropout: float = 0.379) -> None:
        super().__init__()
        self.backbone = tv.resnet18(weights=None)
        self.backbone.fc = nn.Identity()  # the backbone ends in ResNet's own global average pooling
        self.head = nn.Sequential(
            nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, NUM_CLASSES)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class DenseNet121(tv.DenseNet):
    """torchvision's DenseNet121 with its final ReLU as a separate, non-in-place module.

    torchvision applies `F.relu(features, inplace=True)` inside forward, which overwrites the
    activations a Grad-CAM hook on `features` stores (and differently on CPU and GPU). A module of
    its own gives Grad-CAM a clean target layer; the state_dict keys are unchanged.
    """

    def __init__(self) -> None:
        super().__init__(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
        self.final_relu = nn.ReLU(inplace=False)
        self.classifier = nn.Linear(self.classifier.in_features, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.final_relu(self.features(images))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(pooled)


def _build_resnet(constructor: Callable[..., nn.Module]) -> Callable[[float], nn.Module]:
    def build(dropout: float) -> nn.Module:
        model = constructor(weights=None)
        model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
        return model

    return build


def _build_efficientnet_b0(dropout: float) -> nn.Module:
    model = tv.efficientnet_b0(weights=None)  # keeps its own classifier dropout (0.2)
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, NUM_CLASSES)
    return model


def _load_without(prefixes: tuple[str, ...], rename: Callable[[str], str] = lambda key: key):
    """A loader that drops the ImageNet classifier (1000 classes) and keeps everything else."""

    def load(model: nn.Module, state_dict: dict) -> None:
        kept = {rename(k): v for k, v in state_dict.items() if not k.startswith(prefixes)}
        missing, unexpected = model.load_state_dict(kept, strict=False)
        if unexpected or any(not key.startswith(tuple(rename(p) for p in prefixes) + ("head.",)) for key in missing):
            raise RuntimeError(f"ImageNet weights do not fit: missing {missing}, unexpected {unexpected}")

    return load


def _densenet_key(key: str) -> str:
    # Old torchvision DenseNet checkpoints name layers 'norm.1'; the module now calls them 'norm1'.
    for old, new in ((".norm.1", ".norm1"), (".relu.1", ".relu1"), (".conv.1", ".conv1"),
                     (".norm.2", ".norm2"), (".relu.2", ".relu2"), (".conv.2", ".conv2")):
        key = key.replace(old, new)
    return key


def _resnet_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    return [("head (fc)", [model.fc]), ("layer4", [model.layer4]), ("layer3", [model.layer3]),
            ("layer2", [model.layer2]), ("layer1 and stem", [model.layer1, model.conv1, model.bn1])]


def _hybrid_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    backbone = model.backbone
    return [("head (MLP)", [model.head]), ("layer4", [backbone.layer4]), ("layer3", [backbone.layer3]),
            ("layer2", [backbone.layer2]), ("layer1 and stem", [backbone.layer1, backbone.conv1, backbone.bn1])]


def _densenet_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    features = model.features
    return [("head (classifier)", [model.classifier]), ("denseblock4", [features.denseblock4, features.norm5]),
            ("denseblock3", [features.denseblock3, features.transition3]),
            ("denseblock2", [features.denseblock2, features.transition2]),
            ("denseblock1 and stem", [features.denseblock1, features.transition1, features.conv0, features.norm0])]


def _efficientnet_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    features = model.features
    return [("head (classifier)", [model.classifier]), ("stages 7-8", [features[8], features[7]]),
            ("stages 5-6", [features[6], features[5]]), ("stages 3-4", [features[4], features[3]]),
            ("stages 1-2 and stem", [features[2], features[1], features[0]])]


register_model(ModelSpec(
    "resnet18", "ResNet18", _build_resnet(tv.resnet18), lambda m: m.layer4[-1],
    tv.ResNet18_Weights.IMAGENET1K_V1, _load_without(("fc.",)), _resnet_stages,
    lambda m: m.layer2[-1], ("layer4", "layer2"),
))
register_model(ModelSpec(
    "resnet50", "ResNet50", _build_resnet(tv.resnet50), lambda m: m.layer4[-1],
    tv.ResNet50_Weights.IMAGENET1K_V2, _load_without(("fc.",)), _resnet_stages,
    lambda m: m.layer2[-1], ("layer4", "layer2"),
))
register_model(ModelSpec(
    "densenet121", "DenseNet121", lambda dropout: DenseNet121(), lambda m: m.final_relu,
    tv.DenseNet121_Weights.IMAGENET1K_V1, _load_without(("classifier.",), _densenet_key), _densenet_stages,
    lambda m: m.features.denseblock2, ("final_relu", "features.denseblock2"),
))
register_model(ModelSpec(
    "efficientnet_b0", "EfficientNetB0", _build_efficientnet_b0, lambda m: m.features[-1],
    tv.EfficientNet_B0_Weights.IMAGENET1K_V1, _load_without(("classifier.",)), _efficientnet_stages,
    lambda m: m.features[3], ("features[8]", "features[3]"),
))
register_model(ModelSpec(
    "hybrid_sresnet", "Hybrid S-ResNet", HybridSResNet, lambda m: m.backbone.layer4[-1],
    tv.ResNet18_Weights.IMAGENET1K_V1, _load_without(("fc.",), lambda key: f"backbone.{key}"), _hybrid_stages,
    lambda m: m.backbone.layer2[-1], ("backbone.layer4", "backbone.layer2"),
))


# Once a download has failed in this process, later models do not try the network again.
_network_failed = False


def cached_imagenet_path(spec: ModelSpec) -> Path:
    """Where torchvision's weights API keeps a model's ImageNet file: torch.hub's checkpoints folder
    (under TORCH_HOME), named as the last part of the weights' URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.imagenet_weights.url).name


def pretrained_weights_available(model_name: str, weights_file: str | Path | None = None) -> bool:
    """Whether build_model would start from trained weights without the network: the ImageNet file
    is in torchvision's cache (the Hybrid S-ResNet's is ResNet18's), or a local weights file exists.
    Looks at files only; nothing is downloaded."""
    if weights_file and Path(weights_file).expanduser().is_file():
        return True
    return cached_imagenet_path(get_model_spec(model_name)).is_file()


def weights_download_possible(timeout: float = 2.0) -> bool:
    """Whether torchvision's weights server answers a HEAD request (through any proxy urllib is set up
    for, as a real download would be): nothing is downloaded. False once a download has failed here."""
    if _network_failed:
        return False
    url = get_model_spec("resnet18").imagenet_weights.url
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):  # URLError and timeouts are OSErrors
        return False


def fetch_imagenet_state_dict(spec: ModelSpec) -> tuple[dict | None, str]:
    """ImageNet weights from torchvision's cache or a download, else (None, why not)."""
    global _network_failed
    weights = spec.imagenet_weights
    cached = cached_imagenet_path(spec)
    if cached.exists():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True), ""
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file in the cache
            return None, f"the cached file {cached} is unreadable ({type(error).__name__})"
    if _network_failed:
        return None, "they could not be downloaded (offline?)"
    try:
        return weights.get_state_dict(progress=False), ""
    except Exception:  # noqa: BLE001 - no network, proxy refusal, a broken partial download ...
        _network_failed = True
        return None, "they could not be downloaded (offline?)"


def build_model(
    name: str,
    dropout: float = 0.379,
    pretrained: bool = True,
    weights_file: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[nn.Module, str]:
    """A two-class model and the weights it starts from: 'imagenet', 'random' or the file's name.

    `weights_file` is a local state_dict (an ImageNet checkpoint, or a model.pt of an earlier run).
    """
    spec = get_model_spec(name)
    model = spec.build(dropout)
    if weights_file:
        load_weights_file(model, spec, weights_file)
        return model, Path(weights_file).name
    if not pretrained:
        return model, "random"
    state_dict, problem = fetch_imagenet_state_dict(spec)
    if state_dict is None:
        # No model name: the dashboard shows one warning for a queue of runs that all lack weights.
        message = (f"ImageNet weights: {problem}; training from random initialisation. "
                   "A local weights file (--weights-file) can be used instead.")
        (warn or (lambda text: warnings.warn(text, stacklevel=2)))(message)
        return model, "random"
    spec.load_imagenet(model, state_dict)
    return model, "imagenet"


def load_weights_file(model: nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """A local weights file: a full two-class state_dict, or ImageNet weights for the backbone.
    Loaded with weights_only=True: a file that would run code is refused."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights file not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - pickles with code, truncated files, non-torch files
        raise ValueError(f"weights file {path} is not a plain PyTorch state_dict: {error}") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"weights file {path} does not hold a state_dict")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        try:
            spec.load_imagenet(model, state_dict)
        except RuntimeError:
            raise ValueError(f"weights file {path} does not fit {spec.display_name}") from None


# Smallest input every registry model accepts (five stride-2 stages leave 2 x 2); the probe is cheap at it.
_FOLDING_PROBE_SIZE = 64


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, each BatchNorm that reads a convolution's output into that convolution, for inference
    (evaluation, CAMs, the audit): the same function with a batch-norm pass fewer, and 1.1-1.3x faster on a
    CPU (docs/PERFORMANCE.md). The module tree keeps every name, so CAM hooks and stage lists still find
    their layers: each folded BatchNorm becomes an `nn.Identity`.

    Pairs are found by running the model once on a small probe image and matching each BatchNorm's input
    to the convolution call that produced it, which works where `torch.fx` cannot trace (DenseNet). A
    convolution whose output something else also reads would fold wrongly, so the model's output on the
    probe is compared before and after, and any difference undoes every fold. Returns how many pairs were
    folded (0: nothing to fold, or undone). The model must be in eval mode."""
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (training updates the batch statistics)")
    parameter = next(model.parameters())
    probe = torch.randn(1, 3, _FOLDING_PROBE_SIZE, _FOLDING_PROBE_SIZE,
                        generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
    pairs, expected = _conv_batch_norm_pairs(model, probe)
    replaced = []
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        replaced += [(conv_name, conv), (norm_name, norm)]
        _set_submodule(model, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm))
        _set_submodule(model, norm_name, nn.Identity())
    if pairs and not torch.allclose(model(probe), expected, rtol=1e-3, atol=1e-4):
        for name, module in replaced:
            _set_submodule(model, name, module)
        return 0
    return len(pairs)


def _conv_batch_norm_pairs(model: nn.Module, probe: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(convolution name, BatchNorm name) for every BatchNorm2d whose input is the output of a Conv2d, both
    called once in a forward pass on `probe`; and the model's output on it."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    conv_outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept so that no id is reused
    pairs = []

    def on_conv(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        conv_outputs[id(output)] = (names[module], output)

    def on_norm(module, inputs):
        calls[module] = calls.get(module, 0) + 1
        source = conv_outputs.get(id(inputs[0]))
        if source is not None and source[1] is inputs[0]:
            pairs.append((source[0], names[module]))

    hooks = [module.register_forward_hook(on_conv) for module in model.modules() if type(module) is nn.Conv2d]
    hooks += [module.register_forward_pre_hook(on_norm) for module in model.modules()
              if type(module) is nn.BatchNorm2d]
    try:
        expected = model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    once = [(conv, norm) for conv, norm in pairs
            if calls[model.get_submodule(conv)] == 1 and calls[model.get_submodule(norm)] == 1]
    return once, expected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
