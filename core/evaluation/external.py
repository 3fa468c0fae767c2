"""External validation: stored runs applied to every image of another labelled dataset.

Models lose much of their AUC on another clinic's images (Combalia et al. 2022; Daneshjou et al. 2022),
so a run's own test part is not the last word. Each run sees the external images at its own image size,
normalisation and precision (core.evaluation.inference), and the predictions are stored with the run:

    <run>/external/<dataset fingerprint>/predictions.csv   image_id, split ('external'), label, prob_malignant
    <run>/external/<dataset fingerprint>/dataset.json      the dataset's spec, name, fingerprints, counts

Evaluating the same run on the same files again reuses them. A Comparison built with `test_set=<key>`
(core.evaluation.compare) then judges the runs on that set with every table, figure and paired test,
while thresholds chosen "on validation" still come from each run's internal validation part.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.config import DataSpec
from core.data.datasets import PreparedData, load_dataset_images
from core.data.images import files_fingerprint
from core.evaluation.inference import apply_run
from core.runs import RunStore, write_atomically, write_json
from core.stats.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_indices, resampled_auc
from core.stored_run import run_image_size

EXTERNAL_FOLDER = "external"
INTERNAL_TEST = "internal"  # the key of the runs' own test part wherever a test set is chosen


@dataclass(frozen=True)
class ExternalSet:
    """A dataset that runs were evaluated on: `key` names its folder in each run, `name` is for people."""

    key: str
    name: str
    images: int
    malignant: int
    path: str | None = None

    def describe(self) -> str:
        return f"{self.name}: {self.images:,} images, {self.malignant:,} malignant (external)"


@dataclass
class EvaluationOutcome:
    """What `evaluate_runs` did: the set, and per run whether its predictions were computed or reused."""

    external: ExternalSet
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files (image id, reason)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def external_folder(store: RunStore, run_id: str, key: str):
    return store.root / run_id / EXTERNAL_FOLDER / key


def dataset_record(data: PreparedData) -> dict:
    """dataset.json: what the external set is, and the fingerprints that decide whether stored
    predictions still hold (the image ids and labels, and the files' sizes and modification times)."""
    labels = data.table["label"].to_numpy()
    return {
        "key": data.fingerprint,
        "name": data.name,
        "format": data.format,
        "path": data.path,
        "fingerprint": data.fingerprint,
        "files_fingerprint": _files_fingerprint(data),
        "images": int(len(labels)),
        "malignant": int(labels.sum()),
        "skipped": len(data.skipped),
        "spec": data.spec.to_dict() if data.spec is not None else None,
    }


def _files_fingerprint(data: PreparedData) -> str:
    paths = [path for path in data.table.get("path", pd.Series(dtype=str)).tolist() if path]
    return files_fingerprint(paths) if paths else data.fingerprint


def stored_record(store: RunStore, run_id: str, key: str) -> dict | None:
    try:
        return json.loads((external_folder(store, run_id, key) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None


def evaluate_runs(store: RunStore, runs: list[dict], spec: DataSpec,
                  progress: Callable[[int, int, str], None] | None = None,
                  stop: threading.Event | None = None) -> EvaluationOutcome:
    """Apply each run to every image of `spec`'s dataset and store the predictions with the run. The
    dataset is decoded once per image size the runs use (through the image cache); runs whose stored
    predictions match the dataset's fingerprints are not run again. `progress(done, total, text)` counts
    runs; `stop` ends the work between two batches (InterruptedError)."""
    started = time.perf_counter()
    outcome: EvaluationOutcome | None = None
    loaded: dict[int, tuple[PreparedData, dict]] = {}  # per image size: the decoded set and its record
    for number, run in enumerate(runs):
        if stop is not None and stop.is_set():
            raise InterruptedError("stopped")
        if progress:
            progress(number, len(runs), f"{run['model']} (run {number + 1} of {len(runs)})")
        size = run_image_size(run)
        if size not in loaded:
            data = load_dataset_images(spec, size, store.cache_dir)
            loaded[size] = data, dataset_record(data)
        data, record = loaded[size]
        if outcome is None:
            outcome = EvaluationOutcome(_external_set(record), skipped=list(data.skipped))
        outcome.warnings.extend(_overlap_warnings(store, run, data))
        previous = stored_record(store, run["run_id"], record["key"])
        if previous is not None and previous.get("files_fingerprint") == record["files_fingerprint"] and (
                external_folder(store, run["run_id"], record["key"]) / "predictions.csv").is_file():
            outcome.reused.append(run["run_id"])
            continue
        outputs = apply_run(run, store, data.images, stop=stop)
        predictions = pd.DataFrame({"image_id": data.table["image_id"].to_numpy(), "split": "external",
                                    "label": data.table["label"].to_numpy(), "prob_malignant": outputs.probabilities})
        _save(store, run["run_id"], record, predictions)
        outcome.computed.append(run["run_id"])
    if progress:
        progress(len(runs), len(runs), "done")
    if outcome is None:
        raise ValueError("no runs to evaluate")
    outcome.seconds = time.perf_counter() - started
    return outcome


def _save(store: RunStore, run_id: str, record: dict, predictions: pd.DataFrame) -> None:
    folder = external_folder(store, run_id, record["key"])
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "predictions.csv", lambda temporary: predictions.to_csv(temporary, index=False))
    # The record last: predictions without their record are never taken as valid.
    write_json(folder / "dataset.json", {**record, "evaluated_at": time.time()})


def _external_set(record: dict) -> ExternalSet:
    return ExternalSet(record["key"], record.get("name") or record["key"], int(record.get("images", 0)),
                       int(record.get("malignant", 0)), record.get("path"))


def _overlap_warnings(store: RunStore, run: dict, data: PreparedData) -> list[str]:
    """An 'external' set that holds the run's own training images is not external: say so."""
    if data.fingerprint == (run.get("dataset") or {}).get("fingerprint"):
        return [f"run {run['run_id']} was trained on this very dataset: its scores here are not external"]
    try:
        split = pd.read_csv(store.root / run["run_id"] / "split.csv", usecols=["image_id", "split"])
    except (OSError, ValueError):
        return []
    seen = set(split.loc[split["split"] != "test", "image_id"].astype(str))
    shared = int(data.table["image_id"].astype(str).isin(seen).sum())
    if shared:
        return [f"{shared} image id(s) of this set were in run {run['run_id']}'s training or validation part"]
    return []


def evaluated_sets(store: RunStore, run_id: str) -> dict[str, ExternalSet]:
    """The external sets a run has stored predictions for, by key."""
    folder = store.root / run_id / EXTERNAL_FOLDER
    found = {}
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            record = stored_record(store, run_id, child.name)
            if record is not None and (child / "predictions.csv").is_file():
                found[child.name] = _external_set(record)
    return found


def common_external_sets(store: RunStore, runs: list[dict]) -> list[ExternalSet]:
    """The external sets that every one of `runs` has been evaluated on, by name."""
    if not runs:
        return []
    per_run = [evaluated_sets(store, run["run_id"]) for run in runs]
    keys = set(per_run[0]).intersection(*per_run[1:])
    return sorted((per_run[0][key] for key in keys), key=lambda item: item.name)


def external_predictions(store: RunStore, run_id: str, key: str) -> pd.DataFrame:
    """A run's stored predictions on an external set (ValueError when it has none)."""
    path = external_folder(store, run_id, key) / "predictions.csv"
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"run {run_id} has not been evaluated on the external set {key}") from None


def external_spec(store: RunStore, run_id: str, key: str) -> DataSpec | None:
    """How the external set was loaded (for its metadata: subgroups), or None when not recorded."""
    record = stored_record(store, run_id, key) or {}
    return DataSpec.from_dict(record["spec"]) if record.get("spec") else None


@dataclass(frozen=True)
class AucShift:
    internal: float
    external: float
    difference: float  # external - internal
    low: float
    high: float


def auc_shift(internal_labels, internal_scores, external_labels, external_scores,
              resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> AucShift:
    """External minus internal AUC with a 95% interval from independent bootstraps of the two sets
    (they share no images, so the resamples are not paired)."""
    sets = []
    for offset, (labels, scores) in enumerate(((internal_labels, internal_scores), (external_labels, external_scores))):
        labels, scores = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        point = resampled_auc(labels, scores, np.arange(len(labels))[None])[0] if len(labels) else math.nan
        draws = resampled_auc(labels, scores, bootstrap_indices(len(labels), resamples, seed + offset)) if (
            resamples and len(labels)) else np.array([math.nan])
        sets.append((point, draws))
    (internal, internal_draws), (external, external_draws) = sets
    differences = external_draws - internal_draws
    finite = differences[np.isfinite(differences)]
    low, high = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (math.nan, math.nan))
    return AucShift(float(internal), float(external), float(external - internal), float(low), float(high))
