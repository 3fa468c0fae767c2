"""Class activation maps of trained models with the grad-cam package, and measures of their quality.

A `CamExplainer` owns a private, frozen copy of a model: the caller's model is never switched to
eval mode, never gets hooks and never has its gradients zeroed. Its target layer's output is made a
gradient leaf, so a backward pass runs only through the layers after it (the weights need no
gradients), and a lock keeps two sessions from interleaving their hooks on a shared model.

An explanation of a run's test image shows the P(malignant) the run stored in predictions.csv: the
model gets the run's own prepared pixels at its image size (`run_model_input`) and its forward pass
runs in the run's recorded precision (`explainer_for_run`). Only the display is upscaled.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.ablation_layer import AblationLayer
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from scipy import stats as scipy_stats
from torch import nn

from core.data.augment import normalise
from core.data.images import decode_image
from core.models import (
    cam_layer,
    default_cam_method,
    fold_batch_norms,
    get_model_spec,
    named_cam_layer,
)
from core.stored_run import EVALUATION_PRECISIONS, load_trained_model, run_image_size, run_precision

logger = logging.getLogger(__name__)


class RawScale:
    """Keeps each map's own magnitude instead of grad-cam's per-image min-max scaling, so that the maps
    of several models can share one colour scale; maps are only resized to the input size."""

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        activations = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        gradients = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        width, height = self.get_target_width_height(input_tensor)
        per_layer = []
        for index, layer in enumerate(self.target_layers):
            cam = self.get_cam_image(input_tensor, layer, targets, activations[index] if index < len(activations)
                                     else None, gradients[index] if index < len(gradients) else None, eigen_smooth)
            cam = np.maximum(cam, 0).astype(np.float32)
            per_layer.append(np.stack([cv2.resize(single, (width, height)) for single in cam])[:, None])
        return per_layer

    def aggregate_multi_layers(self, cam_per_target_layer):
        return np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0).mean(axis=1)


@dataclass(frozen=True)
class CamMethod:
    name: str
    display_name: str
    cam_class: type
    slow: bool = False  # many forward passes: run in the background


CAM_METHODS = {method.name: method for method in (
    CamMethod("gradcam", "Grad-CAM", GradCAM),
    CamMethod("gradcam++", "Grad-CAM++", GradCAMPlusPlus),
    CamMethod("hirescam", "HiResCAM", HiResCAM),
    CamMethod("xgradcam", "XGrad-CAM", XGradCAM),
    CamMethod("layercam", "LayerCAM", LayerCAM),
    CamMethod("eigencam", "EigenCAM", EigenCAM),
    CamMethod("scorecam", "Score-CAM", ScoreCAM, slow=True),
    CamMethod("ablationcam", "Ablation-CAM", AblationCAM, slow=True),
)}
FAST_METHODS = tuple(name for name, method in CAM_METHODS.items() if not method.slow)
_RAW_CLASSES = {name: type(f"Raw{method.cam_class.__name__}", (RawScale, method.cam_class), {})
                for name, method in CAM_METHODS.items()}


@dataclass
class CamResult:
    model: str
    cam: np.ndarray  # H x W, float32, >= 0, in the model's own units (not scaled)
    probability: float  # P(malignant)
    target_class: int
    method: str
    layer: str = ""  # the hooked layer and its map size, "layer3, 6×6" (core.models.CamLayer.describe)

    @property
    def predicted_class(self) -> int:
        return int(self.probability >= 0.5)

    @property
    def all_zero(self) -> bool:
        return float(self.cam.max()) <= 1e-12

    @property
    def uniform(self) -> bool:
        """A flat map carries no location: typical when the last feature map is 1 x 1 (tiny inputs)."""
        top = float(self.cam.max())
        return top > 1e-12 and float(self.cam.min()) >= 0.98 * top

    def normalised(self, scale: float | None = None) -> np.ndarray:
        """The map in [0, 1]: divided by its own maximum, or by `scale` (a shared maximum)."""
        top = scale if scale is not None else float(self.cam.max())
        return np.clip(self.cam / top, 0, 1) if top > 1e-12 else np.zeros_like(self.cam)


class CamCancelled(RuntimeError):
    """A slow CAM stopped on request between two of its forward passes."""




class ForwardPassProgress:
    """Reports a slow CAM's progress per forward pass of the model, and stops it between passes.

    Score-CAM scores, and Ablation-CAM ablates, the target layer's channels in batches of one forward
    pass each: a ResNet50 needs about 130 passes per image, so progress per model would sit still for a
    long time. The number of passes is known once the first pass has shown how many channels there are.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module, method: str, batch_size: int,
                 progress=None, stop=None) -> None:
        self.model, self.target_layer, self.method, self.batch_size = model, target_layer, method, batch_size
        self.progress, self.stop = progress, stop
        self.passes, self.expected = 0, 1
        self._handles = []

    def __enter__(self) -> ForwardPassProgress:
        self._handles = [self.model.register_forward_pre_hook(self._before_pass),
                         self.model.register_forward_hook(self._after_pass),
                         self.target_layer.register_forward_hook(self._count_channels)]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()

    def _count_channels(self, module, inputs, output) -> None:
        if self.passes == 0:
            channels = int(output.shape[1])
            # The first pass, plus Ablation-CAM's own unablated pass, plus one pass per batch of channels.
            extra = 1 if self.method == "ablationcam" else 0
            self.expected = 1 + extra + math.ceil(channels / self.batch_size)

    def _before_pass(self, module, inputs) -> None:
        if self.stop is not None and self.stop.is_set():
            raise CamCancelled("cancelled")

    def _after_pass(self, module, inputs, output) -> None:
        self.passes += 1
        if self.progress is not None:
            self.progress(min(self.passes / self.expected, 1.0))


class CamExplainer:
    """CAMs of one model; safe to share between threads.

    `precision` is the one the model's run evaluated in (run.json's environment): with 'bf16' the
    reported P(malignant), and the class a 'predicted' target explains, come from a bf16-autocast
    channels-last forward pass as in training's evaluation; the map itself is computed in fp32.
    The explainer runs on its model's device (CPU or CUDA); images may come on any device.

    `image_size` (the model's input size) picks the layer the maps hook (`core.models.cam_layer`): the last
    stage, or a stride-8 stage for small inputs; None keeps the last stage. `layer`, a module's name in
    the model ("layer2", "features.3"), hooks that module instead (to compare layers)."""

    def __init__(self, model: nn.Module, model_name: str, precision: str = "fp32",
                 image_size: int | None = None, layer: str | None = None) -> None:
        if precision not in EVALUATION_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(EVALUATION_PRECISIONS)})")
        self.model_name = model_name
        self.precision = precision
        self.model = copy.deepcopy(model).float().eval()
        fold_batch_norms(self.model)  # the hooked stage outputs, and so the maps, are unchanged
        self.device = next(self.model.parameters()).device
        # oneDNN's and cuDNN's channels-last convolutions make maps and predictions 1.0-1.5x faster than
        # NCHW (docs/PERFORMANCE.md); MPS keeps NCHW, as its training plans do.
        self.model.to(memory_format=torch.channels_last if self.device.type in ("cpu", "cuda")
                      else torch.contiguous_format)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.layer = (cam_layer(get_model_spec(model_name), self.model, image_size) if layer is None
                      else named_cam_layer(self.model, layer))
        self.target_layer = self.layer.module
        self.default_method = default_cam_method(image_size)  # the registry's method for this layer
        self.target_layer.register_forward_hook(self._gradient_leaf)
        self._lock = threading.Lock()
        self._method: str | None = None
        self._cam = None

    @staticmethod
    def _gradient_leaf(module, inputs, output):
        # Backward starts at the logits and stops here: no weight gradients, no work below the layer.
        return output.detach().requires_grad_(True)

    def _cam_object(self, method: str):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r} (choose from {', '.join(CAM_METHODS)})")
        if method != self._method:
            if self._cam is not None:
                self._cam.activations_and_grads.release()
            # Ablation-CAM's default ablation layer is one instance shared by every AblationCAM object (a
            # default argument), and it holds per-batch state: each explainer gets its own.
            options = {"ablation_layer": AblationLayer()} if method == "ablationcam" else {}
            self._cam = _RAW_CLASSES[method](model=self.model, target_layers=[self.target_layer], **options)
            self._method = method
        return self._cam

    def explain(self, image: torch.Tensor, method: str | None = None, target: str | int = "predicted",
                progress=None, stop=None) -> CamResult:
        """The map of one normalised image (1 x 3 x H x W) by `method` (None: the registry's for the layer, see
        `default_method`). target: 'predicted', 0 (benign) or 1 (malignant). Slow methods call
        `progress(fraction)` after each forward pass and raise CamCancelled when
        `stop` (an Event) is set."""
        method = method or self.default_method
        with self._lock:
            probability = self._recorded_precision_probability(image)
            if probability is not None and target == "predicted":
                target = int(probability >= 0.5)  # the class the tile names, not fp32's argmax
            cam = self._cam_object(method)
            # targets=None makes grad-cam explain its own argmax: one forward pass serves both.
            targets = None if target == "predicted" else [ClassifierOutputTarget(int(target))]
            maps = self._run_cam(cam, image, targets, method, progress, stop)
            logits = cam.outputs.detach().float()
            if probability is None:
                probability = float(torch.softmax(logits, 1)[0, 1])
            target_class = int(logits[0].argmax()) if target == "predicted" else int(target)
            return CamResult(self.model_name, maps[0].astype(np.float32), probability, target_class, method,
                             self.layer.describe())

    def explain_batch(self, images: torch.Tensor, method: str, targets: list[int]) -> np.ndarray:
        """The maps of a batch of normalised images (N x 3 x H x W), each for its own target class, in one
        forward and backward pass: N x H x W float32 in the model's own units (the audit's many maps)."""
        with self._lock:
            cam = self._cam_object(method)
            return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets]).astype(
                np.float32)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """P(malignant) of a batch in the run's recorded precision, as training's evaluation computes it."""
        images = images.to(self.device)
        with self._lock, torch.no_grad():
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    logits = self.model(images.contiguous(memory_format=torch.channels_last))
            else:
                logits = self.model(images)
            return torch.softmax(logits.float(), 1)[:, 1].cpu().numpy().astype(np.float64)

    def with_model(self, function):
        """function(model) with this explainer's private fp32 model, while no other thread uses it (a
        metric that runs the model itself, such as ROAD)."""
        with self._lock:
            return function(self.model)

    def _recorded_precision_probability(self, image: torch.Tensor) -> float | None:
        """P(malignant) as training's `evaluate` computes it under a bf16 plan (None for fp32, whose CAM
        forward pass already is that computation)."""
        if self.precision == "fp32":
            return None
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(image.to(self.device).contiguous(memory_format=torch.channels_last)).float()
        return float(torch.softmax(logits, 1)[0, 1])

    def _run_cam(self, cam, image: torch.Tensor, targets, method: str, progress, stop) -> np.ndarray:
        if not CAM_METHODS[method].slow:
            return cam(input_tensor=image, targets=targets)
        counter = ForwardPassProgress(self.model, self.target_layer, method, getattr(cam, "batch_size", 16),
                                      progress, stop)
        try:
            with counter:
                return cam(input_tensor=image, targets=targets)
        finally:
            # Ablation-CAM swaps the target layer for its ablation layer while it runs and puts it back only
            # when it ends normally; after a cancel the shared model must get its own layer back.
            if isinstance(cam, AblationCAM):
                replace_layer_recursive(self.model, cam.ablation_layer, self.target_layer)

    def faithfulness(self, image_uint8: np.ndarray, result: CamResult, size: int,
                     percentiles=(20, 40, 60, 80)) -> float:
        """ROAD (Rong et al. 2022) combined score of the map, at the model's input `size`: the confidence
        change when the least relevant pixels are removed minus when the most relevant are removed,
        averaged; higher is more faithful."""
        heat = cv2.resize(result.normalised(), (size, size))
        with self._lock:
            score = ROADCombined(percentiles=list(percentiles))(
                image_tensor(resize_image(image_uint8, size)).to(self.device), heat[None],
                [ClassifierOutputSoftmaxTarget(result.target_class)], self.model)
        return float(np.asarray(score).reshape(-1)[0])


def explainer_for_run(run: dict, model_path: Path | str, device: str | torch.device = "cpu") -> CamExplainer:
    """The explainer of a stored run: its best weights, and the precision its predictions were computed in."""
    return CamExplainer(load_trained_model(run, model_path, device), run["model"], precision=run_precision(run),
                        image_size=run_image_size(run))


def default_run_method(runs: list[dict]) -> str:
    """The CAM method pages and commands start from for these runs: the registry's for the smallest input."""
    return default_cam_method(min(run_image_size(run) for run in runs) if runs else None)


def decoded_inputs(image_file: bytes, sizes: list[int]) -> list[np.ndarray]:
    """An image file (an upload) decoded at each model's input size with `decode_image`, the function
    the dataset cache decodes files with: each model gets what it would get were the file in its dataset."""
    return [decode_image(io.BytesIO(image_file), size) for size in sizes]


def resize_image(image_uint8: np.ndarray, size: int) -> np.ndarray:
    """A square uint8 image at `size`, unchanged when it already is; resampled as the dataset cache
    resizes the synthetic set (bilinear, reducing gap 2)."""
    if image_uint8.shape[:2] == (size, size):
        return image_uint8
    from PIL import Image

    return np.asarray(Image.fromarray(image_uint8).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A lesion mask at `size` (nearest neighbour, so it stays 0/1)."""
    if mask.shape[:2] == (size, size):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def image_tensor(image_uint8: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W normalised float32."""
    tensor = torch.from_numpy(np.array(image_uint8, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    return normalise(tensor)


COLOUR_MAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
               "viridis": cv2.COLORMAP_VIRIDIS, "hot": cv2.COLORMAP_HOT}


def colour_map_colours(colour_map: str, count: int = 64) -> list[str]:
    """`count` CSS colours of a colour map from 0 to 1, as `overlay` paints a map: for a colour bar."""
    codes = np.linspace(0, 255, count).round().astype(np.uint8)[:, None]
    rgb = cv2.cvtColor(cv2.applyColorMap(codes, COLOUR_MAPS[colour_map]), cv2.COLOR_BGR2RGB)[:, 0]
    return [f"rgb({r},{g},{b})" for r, g, b in rgb.tolist()]


def shared_scale_maximum(results: list[CamResult]) -> float:
    """The largest value of several maps: the top of their shared colour scale."""
    return max((float(r.cam.max()) for r in results), default=0.0)


def overlay(image_uint8: np.ndarray, heat: np.ndarray, opacity: float = 0.5, colour_map: str = "jet") -> np.ndarray:
    """The map (in [0, 1]) over the image as a heatmap, uint8 RGB."""
    return show_cam_on_image(image_uint8.astype(np.float32) / 255, heat, use_rgb=True,
                             colormap=COLOUR_MAPS[colour_map], image_weight=1 - opacity)


def contour_overlay(image_uint8: np.ndarray, heat: np.ndarray, levels=(0.25, 0.5, 0.75)) -> np.ndarray:
    """The paper's contour view: iso-lines of the map drawn on the image (brighter = higher level)."""
    drawn = image_uint8.copy()
    thickness = max(1, image_uint8.shape[0] // 150)
    for level, colour in zip(levels, ((255, 235, 59), (255, 152, 0), (244, 67, 54))):
        contours, _ = cv2.findContours((heat >= level).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(drawn, contours, -1, colour, thickness)
    return drawn


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    if first.std() == 0 or second.std() == 0:
        return math.nan
    return float(scipy_stats.spearmanr(first.ravel(), second.ravel()).statistic)


def top_share_iou(first: np.ndarray, second: np.ndarray, share: float = 0.2) -> float:
    """Intersection over union of the top `share` of pixels of two maps."""
    def top(heat):
        return heat >= np.quantile(heat, 1 - share) if heat.max() > 0 else np.zeros_like(heat, dtype=bool)

    a, b = top(first), top(second)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else math.nan


def agreement_matrices(results: list[CamResult]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise rank correlation and top-20% IoU of the maps."""
    count = len(results)
    correlation, iou = np.eye(count), np.eye(count)
    for i in range(count):
        for j in range(i + 1, count):
            correlation[i, j] = correlation[j, i] = rank_correlation(results[i].cam, results[j].cam)
            iou[i, j] = iou[j, i] = top_share_iou(results[i].cam, results[j].cam)
    return correlation, iou


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total energy inside the lesion mask (NaN for an all-zero map)."""
    total = float(cam.sum())
    return float((cam * (mask > 0)).sum() / total) if total > 0 else math.nan


def pointing_game_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls inside the lesion mask; when several pixels share the maximum, a hit
    if any of them is inside (quantus' PointingGame counts it so; the first one in row order would make
    the answer depend on where the lesion lies)."""
    return bool((mask[cam == cam.max()] > 0).any())


@dataclass
class ExplainedImage:
    """The maps of several models on one image, ready to show or save."""

    image: np.ndarray  # H x W x 3 uint8 at display size
    results: list[CamResult]
    mask: np.ndarray | None = None
    inputs: list[np.ndarray] | None = None  # what each model was given, uint8 at its own input size


def explain_inputs(explainers: list[CamExplainer], inputs: list[np.ndarray], display: np.ndarray,
                   method: str | None = None, target: str | int = "predicted", mask: np.ndarray | None = None,
                   report=None, stop=None) -> ExplainedImage:
    """Every model's map of one image. Each model gets its own input, uint8 at its input size (a run's
    test image: `run_model_input`; a file: `decoded_inputs`), and its map is resized to `display`, which
    is only shown. `method` None: each model's own default (`CamExplainer.default_method`). `report(done,
    total)` moves within a slow method's many forward passes, not only after each model; `stop` (an Event)
    cancels between passes."""
    steps = 100  # per model: slow methods report a fraction of their passes
    height, width = display.shape[:2]
    results = []
    for index, (explainer, image) in enumerate(zip(explainers, inputs)):
        if stop is not None and stop.is_set():
            raise CamCancelled("cancelled")

        def progress(fraction: float, index: int = index) -> None:
            if report is not None:
                report(int((index + fraction) * steps), steps * len(explainers))

        result = explainer.explain(image_tensor(image), method, target, progress, stop)
        if result.cam.shape != (height, width):
            result.cam = cv2.resize(result.cam, (width, height))
        results.append(result)
        progress(1.0)
    return ExplainedImage(display, results, mask, list(inputs))


def explain_image(explainers: list[tuple[CamExplainer, int]], image_uint8: np.ndarray, method: str | None = None,
                  target: str | int = "predicted", mask: np.ndarray | None = None) -> ExplainedImage:
    """Every model's map of one image; each model sees the image resized to its own training size and
    its map is resized back to the image's size. For a run's own test image use `explain_inputs` with
    `run_model_input`: resizing a display-size copy does not give back the pixels the run evaluated."""
    return explain_inputs([explainer for explainer, _ in explainers],
                          [resize_image(image_uint8, size) for _, size in explainers], image_uint8, method, target,
                          mask)


def batch_measures(explainers: list[tuple[CamExplainer, int]], names: list[str], images: np.ndarray,
                   masks: np.ndarray, method: str | None = None, report=None, stop=None) -> dict:
    """Localisation averaged over many images, per model: mean CAM energy inside the lesion, the
    pointing-game hit rate, and the lesion's mean area (what a map blind to the lesion would score).
    Maps explain the malignant class; all-zero maps have no peak and no energy, so they are left out
    of both measures and counted. `report(done, total)` is called after each image."""
    energies = {name: [] for name in names}
    hits = {name: [] for name in names}
    zero = {name: 0 for name in names}
    for index, (image, mask) in enumerate(zip(images, masks)):
        if stop is not None and stop.is_set():
            break
        explained = explain_image(explainers, image, method, target=1, mask=mask)
        for name, result in zip(names, explained.results):
            if result.all_zero:
                zero[name] += 1
                continue
            energies[name].append(energy_inside(result.cam, mask))
            hits[name].append(pointing_game_hit(result.cam, mask))
        if report is not None:
            report(index + 1, len(images))
    return {
        "images": index + 1 if len(images) else 0,
        "lesion_area": float(np.mean([mask.mean() for mask in masks])) if len(masks) else math.nan,
        "rows": [{"Model": name,
                  "CAM energy inside the lesion": float(np.mean(energies[name])) if energies[name] else math.nan,
                  "Pointing-game hit rate": float(np.mean(hits[name])) if hits[name] else math.nan,
                  "Pointing game": pointing_game_text(hits[name], zero[name]),
                  "All-zero maps": zero[name]} for name in names],
    }


def pointing_game_text(hits: list[bool], all_zero: int) -> str:
    """'33/39 (11 all-zero maps left out)': hits over the maps that have a peak, and how many had none."""
    text = f"{sum(hits)}/{len(hits)}"
    if all_zero:
        text += f" ({all_zero} all-zero map{'s' if all_zero != 1 else ''} left out)"
    return text
