"""Maps and predictions of many images at once: the audit recomputes thousands of them, so images go
through each model in batches (one forward and backward pass per batch, never one per image).

Besides the CAM methods, the audit knows one control "method" that ignores the model: the image's own
edges. A sound sanity check must flag it, which is how the check itself is tested (Adebayo et al. 2018
found edge detectors indistinguishable from some saliency methods).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from core.cams import CAM_METHODS, CamExplainer
from core.data.augment import normalise

CONTROL_METHODS = {"edges": "Image edges (control: ignores the model)"}
AUDIT_METHODS = (*CAM_METHODS, *CONTROL_METHODS)
BATCH_SIZE = 32


def method_display_name(method: str) -> str:
    if method in CAM_METHODS:
        return CAM_METHODS[method].display_name
    if method in CONTROL_METHODS:
        return CONTROL_METHODS[method]
    raise ValueError(f"unknown method {method!r} (choose from {', '.join(AUDIT_METHODS)})")


def images_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W normalised float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255
    return normalise(tensor)


def compute_maps(explainer: CamExplainer, images_uint8: np.ndarray, method: str, targets,
                 batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The maps of N images (uint8 at the model's input size) for their target classes: N x H x W float32."""
    method_display_name(method)  # refuses unknown methods with the list of known ones
    if method in CONTROL_METHODS:
        return edge_maps(images_uint8)
    targets = np.broadcast_to(np.asarray(targets, dtype=np.int64), (len(images_uint8),))
    maps = [explainer.explain_batch(images_tensor(images_uint8[start:start + batch_size]), method,
                                    targets[start:start + batch_size].tolist())
            for start in range(0, len(images_uint8), batch_size)]
    return np.concatenate(maps) if maps else np.zeros((0, *images_uint8.shape[1:3]), dtype=np.float32)


def predict(explainer: CamExplainer, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(malignant) of N images in the run's recorded precision."""
    chunks = [explainer.probabilities(images_tensor(images_uint8[start:start + batch_size]))
              for start in range(0, len(images_uint8), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros(0)


def edge_maps(images_uint8: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of each image's grey levels, lightly smoothed: depends on the image only."""
    maps = []
    for image in images_uint8:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
        maps.append(cv2.GaussianBlur(magnitude, (0, 0), max(1.0, image.shape[0] / 64)))
    return np.stack(maps).astype(np.float32) if maps else np.zeros((0, *images_uint8.shape[1:3]), np.float32)


def scaled_to_unit(cam: np.ndarray) -> np.ndarray:
    """A map divided by its maximum (all zeros stay zeros): the scale similarity measures compare."""
    top = float(cam.max())
    return cam / top if top > 1e-12 else np.zeros_like(cam)
