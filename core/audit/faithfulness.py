"""Does removing what the map points at change the prediction? Deletion and insertion (Petsiuk et al.,
BMVC 2018, "RISE").

Deletion replaces the image's pixels by a baseline, most relevant first, and follows the probability of
the explained class: a faithful map makes it fall fast (low area under the curve). Insertion starts from
the baseline and puts the most relevant pixels back: a faithful map makes it rise fast (high area).
The baseline is named because the numbers depend on it: a blurred copy of the image (Petsiuk's choice
for insertion), the image's mean colour, or black.
"""

from __future__ import annotations

import cv2
import numpy as np

from core.audit.maps import images_tensor, predict, scaled_to_unit
from core.cams import CamExplainer

BASELINES = ("blur", "mean", "zero")
DEFAULT_FRACTIONS = 16  # curve points after the start: every 1/16 of the pixels


def baseline_images(images: np.ndarray, baseline: str) -> np.ndarray:
    """What removed pixels are replaced by, per image (uint8, same shape)."""
    if baseline == "blur":
        # Petsiuk et al. blur 224 px images with sigma 5: the same share of the image at any size.
        sigma = 5.0 * images.shape[1] / 224
        return np.stack([cv2.GaussianBlur(image, (0, 0), sigma) for image in images])
    if baseline == "mean":
        return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True).round().astype(np.uint8), images.shape).copy()
    if baseline == "zero":
        return np.zeros_like(images)
    raise ValueError(f"unknown baseline {baseline!r} (choose from {', '.join(BASELINES)})")


def relevance_order(maps: np.ndarray) -> np.ndarray:
    """Per image, pixel indices from the most relevant down (ties keep image order, so results repeat)."""
    flat = maps.reshape(len(maps), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def class_probability(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.where(targets == 1, probabilities, 1 - probabilities)


def deletion_insertion_curves(explainer: CamExplainer, images: np.ndarray, maps: np.ndarray, targets: np.ndarray,
                              baseline: str = "blur", fractions: int = DEFAULT_FRACTIONS,
                              stop=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shares of pixels changed, deletion curves N x F, insertion curves N x F): the probability of each
    image's target class as its most relevant pixels are removed, or inserted into the baseline. Each
    step's N images go through the model as one batch."""
    count, height, width = maps.shape
    order = relevance_order(maps)
    base = baseline_images(images, baseline).reshape(count, height * width, 3)
    flat = images.reshape(count, height * width, 3)
    shares = np.linspace(0, 1, fractions + 1)
    deletion, insertion = np.empty((count, len(shares))), np.empty((count, len(shares)))
    rows = np.arange(count)[:, None]
    for column, share in enumerate(shares):
        if stop is not None and stop.is_set():
            raise InterruptedError("stopped")
        top = order[:, : int(round(share * height * width))]
        deleted, inserted = flat.copy(), base.copy()
        deleted[rows, top] = base[rows, top]
        inserted[rows, top] = flat[rows, top]
        both = np.concatenate([deleted, inserted]).reshape(2 * count, height, width, 3)
        probabilities = class_probability(predict(explainer, both), np.concatenate([targets, targets]))
        deletion[:, column], insertion[:, column] = probabilities[:count], probabilities[count:]
    return shares, deletion, insertion


def area_under(shares: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Per curve, the trapezoid area over the share of pixels (0 to 1)."""
    return np.trapezoid(curves, shares, axis=1)


ROAD_PERCENTILES = (20, 40, 60, 80)


def road_scores(explainer: CamExplainer, images: np.ndarray, maps: np.ndarray, targets: np.ndarray,
                batch_size: int = 16) -> np.ndarray:
    """ROAD (Rong et al., ICML 2022) combined score per image, as the Explain page computes it for one
    image: the confidence change when the least relevant pixels are removed minus when the most relevant
    are, averaged over 20-80% removed; higher is more faithful. Removal imputes pixels from their
    neighbours, so it leaks less shape than a fixed baseline; it is slower (a linear solve per image)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=list(ROAD_PERCENTILES))
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        heat = np.stack([scaled_to_unit(cam) for cam in maps[chunk]]).astype(np.float32)
        outputs = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets[chunk]]
        scores.append(np.asarray(explainer.with_model(
            lambda model, chunk=chunk, heat=heat, outputs=outputs: metric(
                images_tensor(images[chunk]).to(explainer.device), heat, outputs, model))).reshape(-1))
    return np.concatenate(scores) if scores else np.zeros(0)
