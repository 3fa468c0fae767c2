"""A stored run, loaded again: its model with the best weights, the image size and precision it was
evaluated at, the data spec its dataset was loaded from, and that dataset's exact pixels.

Everything that applies a finished run (Explain, the audit, external evaluation, prediction, the OOD
score, resuming) loads it through here, so a run is read back one way only. It sits just above the model
registry and the data layer, below training and the explainers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.config import DataSpec, TrainConfig
from core.data.datasets import PreparedData, prepare_data
from core.models import build_model
from core.runs import RunStore

logger = logging.getLogger(__name__)

# The precisions a run's evaluation can have been computed in (run.json's environment.precision).
EVALUATION_PRECISIONS = ("fp32", "bf16")


class StoredRunError(ValueError):
    """A stored run that lacks something needed to load it again; the message says what in one line."""


def run_image_size(run: dict) -> int:
    return int((run.get("config") or {})["image_size"])


def run_precision(run: dict) -> str:
    """The precision of the run's evaluation as run.json's environment records it (fp32 when it does not)."""
    precision = (run.get("environment") or {}).get("precision", "fp32")
    return precision if precision in EVALUATION_PRECISIONS else "fp32"


def recorded_data_spec(run: dict) -> DataSpec:
    """How the run's dataset was loaded, to load it again."""
    spec = (run.get("dataset") or {}).get("spec")
    if spec is None:
        raise StoredRunError("the run does not record how its dataset was loaded (trained by an older version)")
    return DataSpec.from_dict(spec)


def load_run_data(run: dict, store: RunStore) -> PreparedData:
    """The run's dataset prepared as the run prepared it (its recorded spec, image size, split and subset)."""
    return prepare_data(recorded_data_spec(run), TrainConfig.from_dict(run["config"]), store.cache_dir)


def load_trained_model(run: dict, model_path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """A stored run's model with its best weights (torch.load with weights_only=True), on `device`."""
    started = time.perf_counter()
    config = run.get("config") or {}
    model, _ = build_model(run["model"], dropout=float(config.get("dropout", 0.0)), pretrained=False)
    try:
        state_dict = torch.load(model_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"run {run['run_id']} has no model.pt") from None
    except Exception as error:  # noqa: BLE001 - a file that would run code, or a damaged one
        raise ValueError(f"run {run['run_id']}: model.pt is not a plain state_dict ({error})") from None
    model.load_state_dict(state_dict)
    model.to(device)
    # A server's log then shows how often models are loaded: once per run when caching works.
    logger.info("loaded the model of run %s in %.2f s", run["run_id"], time.perf_counter() - started)
    return model.eval()


def run_model_input(run: dict, data: PreparedData, image_id: str) -> np.ndarray:
    """The exact pixels the run evaluated for `image_id`: its dataset's prepared uint8 image at the run's
    image size, as `prepare_data` gave it to training (not a display-size copy resized back, whose
    pixels differ). Raises ValueError when `data` is not the run's dataset prepared at the run's size,
    or does not hold the image."""
    size = run_image_size(run)
    if data.images.shape[1:3] != (size, size):
        raise ValueError(f"the dataset was prepared at {data.images.shape[1]} px, run {run['run_id']} at {size} px")
    recorded = (run.get("dataset") or {}).get("fingerprint")
    if recorded and recorded != data.fingerprint:
        raise ValueError(f"the dataset is not the one run {run['run_id']} was trained on")
    rows = np.flatnonzero(data.table["image_id"].to_numpy() == image_id)
    if not len(rows):
        raise ValueError(f"image {image_id} is not in the dataset of run {run['run_id']}")
    return data.images[rows[0]]
