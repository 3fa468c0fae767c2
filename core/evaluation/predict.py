"""Batch prediction on images without labels: each run's P(malignant), its decision at the run's own
threshold, and how unlike the run's training images each image is (the out-of-distribution score of
core.evaluation.ood). The CLI's `predict`, the Predict page and the Explain page's uploads share it."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from core.data.images import IMAGE_SUFFIXES, ImageError, decode_image, decode_images_cached
from core.evaluation.inference import apply_run, load_run_model
from core.evaluation.ood import OodDetector, apply_with_stage_features, ood_detector
from core.models import get_model_spec
from core.runs import RunStore
from core.stats.metrics import predict_labels
from core.stored_run import run_image_size

PREDICTION_COLUMNS = ("image", "path", "model", "run_id", "prob_malignant", "threshold", "decision", "ood_score",
                      "ood_threshold", "out_of_distribution")
CHUNK_IMAGES = 256  # images decoded and predicted at once: bounds memory on a large folder
DISPLAY_SIZE = 224  # the CAM figures' tiles

# progress(done, total, text): steps are images decoded per image size plus images predicted per run.
Progress = Callable[[int, int, str], None]


@dataclass
class ScoredImages:
    """One run's outputs on a batch of images."""

    probabilities: np.ndarray  # N, P(malignant)
    ood_scores: np.ndarray  # N, NaN without a detector
    out_of_distribution: np.ndarray  # N bool, False without a detector
    ood_threshold: float  # NaN without a detector


@dataclass
class PredictionResult:
    """One row per image and run (PREDICTION_COLUMNS), the files that could not be read, and why some runs
    have no OOD score."""

    table: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    notes: list[str] = field(default_factory=list)
    images: int = 0  # readable images

    def flagged_counts(self) -> dict[str, int]:
        """Per run id: how many images are beyond its OOD threshold."""
        if self.table.empty:
            return {}
        return {str(run_id): int(flags.sum()) for run_id, flags in
                self.table.groupby("run_id", sort=False)["out_of_distribution"]}

    def warnings(self) -> list[str]:
        """'3 of 40 images look unlike run X's training data (ResNet18)', one per run with such images."""
        models = dict(zip(self.table["run_id"], self.table["model"])) if not self.table.empty else {}
        return [f"{count} of {self.images} image{'s' if self.images != 1 else ''} look unlike run {run_id}'s "
                f"training data ({models[run_id]}): treat its P(malignant) for them with caution"
                for run_id, count in self.flagged_counts().items() if count]


def score_images(run: dict, store: RunStore, images_uint8: np.ndarray, model: nn.Module | None = None,
                 detector: OodDetector | None = None, progress=None, stop=None) -> ScoredImages:
    """P(malignant) of uint8 images at the run's size, and with a detector their OOD scores and flags, from
    one forward pass."""
    if detector is None:
        outputs = apply_run(run, store, images_uint8, model=model, progress=progress, stop=stop)
        count = len(outputs.probabilities)
        return ScoredImages(outputs.probabilities, np.full(count, np.nan), np.zeros(count, dtype=bool), np.nan)
    outputs, stage_features = apply_with_stage_features(run, store, images_uint8, model, progress, stop)
    scores = detector.score(stage_features)
    return ScoredImages(outputs.probabilities, scores, detector.flag(scores), detector.threshold)


def image_files(folder: str | Path) -> list[Path]:
    """The image files under a folder (sub-folders included, hidden files left out), sorted; ValueError when
    it is not a folder or holds none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def predict_images(runs: list[dict], store: RunStore, paths: Sequence[str | Path], progress: Progress | None = None,
                   stop: threading.Event | None = None,
                   detectors: dict[str, OodDetector] | None = None) -> PredictionResult:
    """Every run on every image file, each run at its own image size. Unreadable files are skipped and
    listed. `detectors` (by run id) saves loading stored ones; a run without one gets its stored detector,
    fitted on first use, or a note saying why it has none. Raises InterruptedError when `stop` is set."""
    paths = [str(path) for path in paths]

    def decode(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        decoded = decode_images_cached([paths[i] for i in indices], size, None)
        return decoded.images, indices[decoded.kept], [(int(indices[i]), reason) for i, reason in decoded.skipped]

    return _predict(runs, store, [Path(path).name for path in paths], paths, decode, progress, stop, detectors)


def predict_uploads(runs: list[dict], store: RunStore, files: Sequence[tuple[str, bytes]],
                    progress: Progress | None = None, stop: threading.Event | None = None,
                    detectors: dict[str, OodDetector] | None = None) -> PredictionResult:
    """`predict_images` for images in memory (uploads): (file name, bytes) each."""
    def decode(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        images, kept, skipped = [], [], []
        for index in indices:
            try:
                images.append(decode_image(io.BytesIO(files[index][1]), size))
                kept.append(int(index))
            except ImageError as error:
                skipped.append((int(index), str(error)))
            except Exception as error:  # noqa: BLE001 - whatever PIL raises on hostile bytes skips that file
                skipped.append((int(index), f"not a readable image ({type(error).__name__})"))
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
        return stacked, np.asarray(kept, dtype=np.int64), skipped

    return _predict(runs, store, [name for name, _ in files], [""] * len(files), decode, progress, stop, detectors)


def run_detectors(runs: list[dict], store: RunStore, models: dict[str, nn.Module] | None = None,
                  known: dict[str, OodDetector] | None = None, progress: Progress | None = None,
                  stop=None) -> tuple[dict[str, OodDetector], list[str]]:
    """Each run's OOD detector (stored, or fitted now on its own dataset), and a note per run that has
    none saying why."""
    detectors, notes = dict(known or {}), []
    for run in runs:
        if run["run_id"] in detectors:
            continue
        name = get_model_spec(run["model"]).display_name

        def report(done: int, total: int, name: str = name) -> None:
            if progress is not None:
                progress(0, 1, f"{name}: fitting its OOD score on its own training and validation images "
                               f"(once per run), {done}/{total}")

        try:
            detectors[run["run_id"]] = ood_detector(run, store, (models or {}).get(run["run_id"]), report, stop)
        except ValueError as error:
            notes.append(f"no OOD score for run {run['run_id']} ({name}): {error}")
    return detectors, notes


def _predict(runs, store, names, paths, decode, progress, stop, known) -> PredictionResult:
    if not runs:
        raise ValueError("no runs to predict with")
    models = {run["run_id"]: load_run_model(run, store) for run in runs}
    detectors, notes = run_detectors(runs, store, models, known, progress, stop)
    sizes = sorted({run_image_size(run) for run in runs})
    total, done = len(names) * (len(sizes) + len(runs)), 0
    rows, skipped, readable = [], {}, 0
    for start in range(0, len(names), CHUNK_IMAGES):
        indices = np.arange(start, min(start + CHUNK_IMAGES, len(names)))
        decoded = {}
        for size in sizes:
            if stop is not None and stop.is_set():
                raise InterruptedError("stopped")
            decoded[size] = decode(indices, size)
            skipped.update((index, reason) for index, reason in decoded[size][2] if index not in skipped)
            done += len(indices)
            _report(progress, done, total, f"decoded {min(start + len(indices), len(names))} of {len(names)} images")
        # A file unreadable at any size is left out for every run, so that every run sees the same images.
        kept = np.array([index for index in indices if index not in skipped], dtype=np.int64)
        readable += len(kept)
        for run in runs:
            images, held = decoded[run_image_size(run)][:2]
            images = images[np.searchsorted(held, kept)] if len(kept) else images[:0]
            scored = score_images(run, store, images, models[run["run_id"]], detectors.get(run["run_id"]),
                                  stop=stop)
            rows.extend(_rows(run, kept, [names[i] for i in kept], [paths[i] for i in kept], scored))
            done += len(indices)
            _report(progress, done, total, get_model_spec(run["model"]).display_name)
    # Rows come run by run; a reader wants each image's runs together, in the order the runs were given.
    table = pd.DataFrame(rows, columns=["_image", *PREDICTION_COLUMNS])
    order = {run["run_id"]: position for position, run in enumerate(runs)}
    table = table.assign(_run=table["run_id"].map(order)).sort_values(["_image", "_run"], kind="stable")
    table = table.drop(columns=["_image", "_run"]).reset_index(drop=True)
    return PredictionResult(table, [(names[index], reason) for index, reason in sorted(skipped.items())], notes,
                            readable)


def _rows(run: dict, indices: np.ndarray, names: list[str], paths: list[str], scored: ScoredImages) -> list[dict]:
    threshold = float((run.get("config") or {}).get("threshold", 0.5))
    decisions = predict_labels(scored.probabilities, threshold)
    model = get_model_spec(run["model"]).display_name
    return [{"_image": int(index), "image": name, "path": path, "model": model, "run_id": run["run_id"],
             "prob_malignant": float(prob), "threshold": threshold, "decision": "malignant" if decision else "benign",
             "ood_score": float(score), "ood_threshold": float(scored.ood_threshold), "out_of_distribution": bool(flag)}
            for index, name, path, prob, decision, score, flag in zip(
                indices, names, paths, scored.probabilities, decisions, scored.ood_scores, scored.out_of_distribution)]


def _report(progress, done: int, total: int, text: str) -> None:
    if progress is not None:
        progress(done, total, text)


def write_cam_figures(runs: list[dict], store: RunStore, paths: Sequence[str | Path], out_dir: str | Path,
                      method: str | None = None, result: PredictionResult | None = None,
                      progress: Progress | None = None, stop: threading.Event | None = None) -> list[Path]:
    """One PNG per readable image: each run's map of it side by side (heatmap over contours, the Explain
    page's figure), each model at its own input size. With `result`, a model's subtitle says when the image
    is out of its distribution. Returns the files written; unreadable images are left out. `method` None: the
    Explain page's default for these runs."""
    from PIL import Image

    from core.cams import CAM_METHODS, default_run_method, explain_inputs, explainer_for_run
    from core.figures import explanation_panels, labelled_grid

    method = method or default_run_method(runs)
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r} (choose from {', '.join(CAM_METHODS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explainers = [explainer_for_run(run, store.model_path(run["run_id"])) for run in runs]
    flagged = set()
    if result is not None and not result.table.empty:
        rows = result.table[result.table["out_of_distribution"]]
        flagged = set(zip(rows["path"], rows["run_id"]))
    written, stems = [], set()
    for number, path in enumerate(map(str, paths), start=1):
        if stop is not None and stop.is_set():
            raise InterruptedError("stopped")
        try:
            display = decode_image(path, DISPLAY_SIZE)
            inputs = [decode_image(path, run_image_size(run)) for run in runs]
        except ImageError:
            continue
        explained = explain_inputs(explainers, inputs, display, method)
        panels = [(title + (" · OOD" if (path, run["run_id"]) in flagged else ""), subtitle, images)
                  for (title, subtitle, images), run in zip(explanation_panels(explained), runs)]
        stem = _unused_stem(f"{Path(path).stem}-{method}", stems)
        target = out / f"{stem}.png"
        Image.fromarray(labelled_grid(panels)).save(target)
        written.append(target)
        _report(progress, number, len(paths), f"maps of {Path(path).name}")
    return written


def _unused_stem(stem: str, used: set[str]) -> str:
    """Two images of one name in different sub-folders get two figures."""
    candidate, number = stem, 2
    while candidate in used:
        candidate, number = f"{stem}-{number}", number + 1
    used.add(candidate)
    return candidate
