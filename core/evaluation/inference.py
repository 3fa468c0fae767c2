"""A stored run applied to images it was not trained on: P(malignant), and the features its classifier sees.

Everything that predicts outside training (external evaluation, batch prediction, the out-of-distribution
score) goes through `apply_model`, so that every image is seen as training's `evaluate` saw its test
images: uint8 at the run's own image size, ImageNet normalisation, and the run's recorded precision.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.data.augment import normalise, to_unit_float
from core.models import fold_batch_norms
from core.runs import RunStore
from core.stored_run import load_trained_model, run_precision

BATCH_SIZE = 64


@dataclass
class ModelOutputs:
    probabilities: np.ndarray  # N float64, P(malignant)
    features: np.ndarray | None  # N x D float64: the input of the last linear layer (None unless asked)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer, whose input is the penultimate feature vector: `fc` of the ResNets, the
    last Linear of DenseNet's, EfficientNet's and the Hybrid head's classifier. Every registry model ends
    in one, so no per-model entry is needed."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer")
    return linears[-1]


def load_run_model(run: dict, store: RunStore) -> nn.Module:
    """The run's best weights in eval mode with conv + BN folded, for inference only (ValueError when
    model.pt is missing or not a state_dict)."""
    model = load_trained_model(run, store.model_path(run["run_id"]))
    fold_batch_norms(model)
    return model


@torch.inference_mode()
def apply_model(model: nn.Module, images_uint8: np.ndarray, precision: str = "fp32", features: bool = False,
                batch_size: int = BATCH_SIZE, progress: Callable[[int, int], None] | None = None,
                stop: threading.Event | None = None) -> ModelOutputs:
    """P(malignant) of N x S x S x 3 uint8 images (already at the model's input size), and with `features`
    the classifier's input per image. `precision` 'bf16' runs as training evaluated under a bf16 plan
    (autocast, channels-last). Raises InterruptedError when `stop` is set between two batches."""
    model.eval()
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = classifier_layer(model).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().float().flatten(1).cpu())
    ) if features else None
    probabilities = []
    try:
        for start in range(0, len(images_uint8), batch_size):
            if stop is not None and stop.is_set():
                raise InterruptedError("stopped")
            # A copy per batch: the images may be a read-only memory map of the image cache.
            batch = torch.from_numpy(np.array(images_uint8[start: start + batch_size])).permute(0, 3, 1, 2)
            inputs = normalise(to_unit_float(batch.to(device)))
            if precision == "bf16":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(inputs.contiguous(memory_format=torch.channels_last)).float()
            else:
                logits = model(inputs).float()
            probabilities.append(torch.softmax(logits, 1)[:, 1].cpu())
            if progress is not None:
                progress(min(start + batch_size, len(images_uint8)), len(images_uint8))
    finally:
        if hook is not None:
            hook.remove()
    probs = torch.cat(probabilities).numpy().astype(np.float64) if probabilities else np.zeros(0)
    feats = torch.cat(captured).numpy().astype(np.float64) if features and captured else (
        np.zeros((0, 0)) if features else None)
    return ModelOutputs(probs, feats)


def apply_run(run: dict, store: RunStore, images_uint8: np.ndarray, features: bool = False,
              model: nn.Module | None = None, progress=None, stop=None) -> ModelOutputs:
    """`apply_model` with the run's model (loaded unless given) and its recorded precision."""
    model = model if model is not None else load_run_model(run, store)
    return apply_model(model, images_uint8, run_precision(run), features, progress=progress, stop=stop)
