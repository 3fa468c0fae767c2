"""The explanation audit of stored runs: which runs, images and settings, computing or reusing each
result, and gathering them into the audit's one report (audit.json, CSVs, figures).

Every map the audit computes explains the malignant class, as the Explain page's localisation does,
except faithfulness, which follows Petsiuk et al. and explains each image's predicted class.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from core.audit import store as audit_store
from core.audit.artefacts import ARTEFACT_KINDS
from core.audit.faithfulness import BASELINES, area_under, deletion_insertion_curves, road_scores
from core.audit.localisation import load_masks, localisation_measures
from core.audit.maps import AUDIT_METHODS, compute_maps, predict
from core.audit.randomisation import DEFAULT_STEPS, randomisation_check
from core.audit.shortcuts import artefact_test
from core.cams import CamExplainer
from core.config import DataSpec, TrainConfig
from core.data.datasets import PreparedData, check_allowed, prepare_data
from core.models import cam_layer_name, get_model_spec
from core.runs import RunStore
from core.stats.uncertainty import mean_interval
from core.stored_run import load_trained_model, run_image_size, run_precision

CHECKS = ("randomisation", "artefacts", "localisation", "faithfulness")
CHECK_NAMES = {"randomisation": "Randomisation sanity check", "artefacts": "Artefact (shortcut) test",
               "localisation": "Localisation against lesion masks", "faithfulness": "Faithfulness (deletion/insertion)"}
LOCALISATION_MEASURES = ("energy_inside", "pointing_game", "relevance_mass", "relevance_rank", "top_iou")


@dataclass(frozen=True)
class AuditSettings:
    """What an audit computes. The default is the one whose speed docs/PERFORMANCE.md records."""

    methods: tuple[str, ...] = ("gradcam",)
    checks: tuple[str, ...] = CHECKS
    images: int = 50
    seed: int = 0
    steps: int = DEFAULT_STEPS
    baseline: str = "blur"
    artefacts: tuple[str, ...] = ARTEFACT_KINDS
    masks_dir: str | None = None
    top_share: float = 0.2
    road: bool = False  # ROAD in faithfulness too: about 1 s per image on two cores, so asked for

    def __post_init__(self) -> None:
        problems = []
        for method in self.methods:
            if method not in AUDIT_METHODS:
                problems.append(f"unknown method {method!r} (choose from {', '.join(AUDIT_METHODS)})")
        for check in self.checks:
            if check not in CHECKS:
                problems.append(f"unknown check {check!r} (choose from {', '.join(CHECKS)})")
        for kind in self.artefacts:
            if kind not in ARTEFACT_KINDS:
                problems.append(f"unknown artefact {kind!r} (choose from {', '.join(ARTEFACT_KINDS)})")
        if not self.methods or not self.checks:
            problems.append("choose at least one method and one check")
        if self.images < 2:
            problems.append("the audit needs at least 2 images")
        if not 2 <= self.steps <= 8:
            problems.append("randomisation steps must be between 2 and 8")
        if self.baseline not in BASELINES:
            problems.append(f"unknown baseline {self.baseline!r} (choose from {', '.join(BASELINES)})")
        if not 0 < self.top_share < 1:
            problems.append("the top share must be between 0 and 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Audit:
    """An audit's results: `report` is audit.json (check -> run id -> method or artefact -> numbers)."""

    runs: list[dict]
    records: list[dict]  # every stored result used, each with its per-image rows
    report: dict
    notes: list[str] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0

    def records_of(self, check: str) -> list[dict]:
        return [record for record in self.records if record["check"] == check]


@dataclass
class _RunInputs:
    """One run's audit images: ids, uint8 pixels at the run's size, labels and masks (None: no masks)."""

    image_ids: list[str]
    images: np.ndarray
    labels: np.ndarray
    masks: dict[str, np.ndarray]
    masks_source: str


def run_data(run: dict, store: RunStore, cache: dict | None = None) -> PreparedData:
    """The run's dataset prepared as the run prepared it (its image size, split and subset)."""
    config = TrainConfig.from_dict(run.get("config") or {})
    recorded = (run.get("dataset") or {}).get("spec")
    if recorded is None:
        raise ValueError(f"run {run['run_id']} does not record its dataset (trained by an older version)")
    spec = DataSpec.from_dict(recorded)
    key = (json.dumps(spec.to_dict(), sort_keys=True, default=str), config.image_size, config.split,
           config.val_fraction, config.seed, config.max_images)
    if cache is not None and key in cache:
        return cache[key]
    data = prepare_data(spec, config, store.cache_dir)
    if cache is not None:
        cache.clear()  # one dataset in memory at a time
        cache[key] = data
    return data


def choose_test_images(data: PreparedData, count: int, seed: int) -> np.ndarray:
    """Row numbers of `count` test images drawn with the seed (all of them when there are fewer), in
    dataset order: the same images for every run on the same data and split."""
    test = data.indices("test")
    if len(test) <= count:
        return test
    return np.sort(np.random.default_rng([seed, 0xA0D1]).choice(test, size=count, replace=False))


def run_inputs(run: dict, data: PreparedData, settings: AuditSettings) -> _RunInputs:
    rows = choose_test_images(data, settings.images, settings.seed)
    ids = data.table["image_id"].to_numpy()[rows].tolist()
    masks, source = {}, "none"
    if settings.masks_dir:
        check_allowed(settings.masks_dir)
        masks = load_masks(settings.masks_dir, ids, int(data.images.shape[1]))
        source = f"folder {settings.masks_dir}"
    elif data.masks is not None:
        masks = {image_id: data.masks[row] for image_id, row in zip(ids, rows)}
        source = "the dataset's masks"
    return _RunInputs(ids, data.images[rows], data.table["label"].to_numpy()[rows].astype(int), masks, source)


def check_runs(store: RunStore, run_ids: list[str]) -> list[dict]:
    """The stored runs named, refused with one line when one is unknown or has no model."""
    runs = []
    for run_id in run_ids:
        run = store.load(run_id)
        if run is None:
            raise ValueError(f"no run {run_id} in {store.root}")
        if not store.model_path(run_id).exists():
            raise ValueError(f"run {run_id} has no model.pt (it stopped before its first epoch ended)")
        runs.append(run)
    return runs


class _Progress:
    """Counts finished steps and reports them as `report(done, total)`."""

    def __init__(self, total: int, report) -> None:
        self.done, self.total, self.report = 0, max(total, 1), report

    def step(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def planned_steps(runs: list[dict], settings: AuditSettings) -> int:
    per_method = sum(check in settings.checks for check in ("randomisation", "localisation", "faithfulness"))
    return len(runs) * (len(settings.methods) * per_method + ("artefacts" in settings.checks))


def run_audit(store: RunStore, runs: list[dict], settings: AuditSettings = AuditSettings(), report=None,
              stop=None, device: str = "cpu") -> Audit:
    """Audit `runs` (one per model, as a rule): each result is reused when stored with the same runs,
    method, images, seed and settings, else computed and stored with its run. `report(done, total)` moves
    after each result; `stop` (an Event) ends the audit between two steps with InterruptedError, keeping
    what is stored. The models run on `device` ('cpu' or 'cuda')."""
    started = time.perf_counter()
    progress = _Progress(planned_steps(runs, settings), report)
    audit = Audit(runs=runs, records=[], report={})
    cache: dict = {}
    for run in runs:
        _audit_run(store, run, settings, audit, progress, cache, stop, device)
    audit.report = assemble_report(audit.records, settings.checks, runs)
    audit.seconds = time.perf_counter() - started
    if "localisation" in settings.checks and not audit.records_of("localisation"):
        audit.notes.append("localisation skipped: no lesion masks for the audited images (give --masks-dir)")
    return audit


class _LazyModel:
    """A run's trained model and its explainer, loaded once, and only when a result must be computed (a
    repeated audit only reads what is stored)."""

    def __init__(self, run: dict, store: RunStore, device: str = "cpu") -> None:
        self.run, self.store, self.device = run, store, device
        self._model = self._explainer = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_trained_model(self.run, self.store.model_path(self.run["run_id"]), self.device)
        return self._model

    @property
    def explainer(self) -> CamExplainer:
        if self._explainer is None:
            self._explainer = CamExplainer(self.model, self.run["model"], precision=run_precision(self.run),
                                           image_size=run_image_size(self.run))
        return self._explainer


def _audit_run(store: RunStore, run: dict, settings: AuditSettings, audit: Audit, progress: _Progress,
               cache: dict, stop, device: str = "cpu") -> None:
    inputs = run_inputs(run, run_data(run, store, cache), settings)
    loaded = _LazyModel(run, store, device)
    for method in settings.methods:
        malignant_maps = None

        def maps_for_malignant(method: str = method) -> np.ndarray:
            nonlocal malignant_maps
            if malignant_maps is None:
                malignant_maps = compute_maps(loaded.explainer, inputs.images, method, 1)
            return malignant_maps

        for check in ("randomisation", "localisation", "faithfulness"):
            if check not in settings.checks:
                continue
            if check != "localisation" or inputs.masks:
                _record_check(store, run, check, method, settings, inputs, loaded, maps_for_malignant, audit, stop)
            progress.step()
    if "artefacts" in settings.checks:  # one test per run; its maps use the first method
        _record_check(store, run, "artefacts", settings.methods[0], settings, inputs, loaded, None, audit, stop)
        progress.step()


def _record_check(store: RunStore, run: dict, check: str, method: str, settings: AuditSettings,
                  inputs: _RunInputs, loaded: _LazyModel, maps_for_malignant, audit: Audit, stop) -> None:
    """Add one check's result to the audit: the stored one when its key matches, else computed and stored."""
    _stop_if_asked(stop)
    folder = store.root / run["run_id"]
    settings_part = _check_settings(check, settings, inputs, run)
    ids = _check_image_ids(check, inputs)
    key = audit_store.result_key(check, method, ids, settings.seed, settings_part)
    record = audit_store.load_result(folder, check, method, key)
    if record is None:
        started = time.perf_counter()
        summary, rows, arrays = _compute(check, method, run, loaded, inputs, settings, maps_for_malignant, stop)
        record = {"check": check, "method": method, "key": key, "run_id": run["run_id"], "model": run["model"],
                  "seed": settings.seed, "images": ids, "settings": settings_part,
                  "seconds": time.perf_counter() - started, "summary": summary, "per_image": rows}
        record["path"] = str(audit_store.save_result(folder, record, arrays))
        audit.computed += 1
    else:
        record["path"] = str(audit_store.result_path(folder, check, method, key))
        audit.reused += 1
    audit.records.append(record)


def _stop_if_asked(stop) -> None:
    if stop is not None and stop.is_set():
        raise InterruptedError("audit stopped")


def _check_image_ids(check: str, inputs: _RunInputs) -> list[str]:
    if check == "localisation":
        return [image_id for image_id in inputs.image_ids if image_id in inputs.masks]
    if check == "artefacts":
        return [image_id for image_id, label in zip(inputs.image_ids, inputs.labels) if label == 0]
    return list(inputs.image_ids)


def _check_settings(check: str, settings: AuditSettings, inputs: _RunInputs, run: dict) -> dict:
    """The settings a check's result depends on beyond method, images and seed (part of its key), including the
    layer the maps hook (a result computed on another layer is not reused)."""
    layer = {"layer": cam_layer_name(get_model_spec(run["model"]), run_image_size(run))}
    if check == "randomisation":
        return {"steps": settings.steps, **layer}
    if check == "artefacts":
        return {"artefacts": list(settings.artefacts), "threshold": _run_threshold(run),
                "masks": inputs.masks_source, **layer}
    if check == "localisation":
        return {"top_share": settings.top_share, "masks": inputs.masks_source, **layer}
    return {"baseline": settings.baseline, "road": settings.road, **layer}


def _run_threshold(run: dict) -> float:
    return float((run.get("config") or {}).get("threshold", 0.5))


def _compute(check: str, method: str, run: dict, loaded: _LazyModel, inputs: _RunInputs, settings: AuditSettings,
             maps_for_malignant, stop) -> tuple[dict, list[dict], dict | None]:
    """(summary, per-image rows, example arrays or None) of one check."""
    ids, explainer = inputs.image_ids, loaded.explainer
    if check == "randomisation":
        result = randomisation_check(loaded.model, run["model"], inputs.images, method, maps_for_malignant(),
                                     settings.steps, settings.seed, stop)
        rows = [{"image_id": ids[row["image"]], "step": row["step"], "spearman": row["spearman"], "ssim": row["ssim"]}
                for row in result["per_image"]]
        rows += [{"image_id": image_id, "step": "other_class", **row}
                 for image_id, row in zip(ids, result["other_class_per_image"])]
        summary = {key: value for key, value in result.items() if not key.endswith("per_image")}
        return summary, rows, None
    if check == "localisation":
        keep = [index for index, image_id in enumerate(ids) if image_id in inputs.masks]
        maps = maps_for_malignant()
        rows = [{"image_id": ids[index], "label": int(inputs.labels[index]),
                 **localisation_measures(maps[index], inputs.masks[ids[index]], settings.top_share)}
                for index in keep]
        return localisation_summary(rows, settings.seed), rows, None
    if check == "faithfulness":
        predicted = (predict(explainer, inputs.images) >= 0.5).astype(np.int64)
        maps = compute_maps(explainer, inputs.images, method, predicted)
        shares, deletion, insertion = deletion_insertion_curves(explainer, inputs.images, maps, predicted,
                                                                settings.baseline, stop=stop)
        measures = {"deletion": area_under(shares, deletion), "insertion": area_under(shares, insertion)}
        measures["score"] = measures["insertion"] - measures["deletion"]
        if settings.road:
            measures["road"] = road_scores(explainer, inputs.images, maps, predicted)
        rows = [{"image_id": image_id, "target_class": int(target),
                 **{name: float(values[index]) for name, values in measures.items() if name != "score"}}
                for index, (image_id, target) in enumerate(zip(ids, predicted))]
        summary = {"baseline": settings.baseline, "images": len(ids),
                   "deletion_curve": deletion.mean(0).tolist(), "insertion_curve": insertion.mean(0).tolist(),
                   "shares": shares.tolist()}
        for name, values in measures.items():
            interval = mean_interval(values, seed=settings.seed)
            summary.update({name: interval.value, f"{name}_low": interval.low, f"{name}_high": interval.high})
        return summary, rows, None
    benign = np.flatnonzero(inputs.labels == 0)
    masks = np.stack([inputs.masks[ids[index]] for index in benign]) if inputs.masks and all(
        ids[index] in inputs.masks for index in benign) else None
    result = artefact_test(explainer, inputs.images[benign], masks, _run_threshold(run), settings.artefacts, method,
                           settings.seed, stop=stop)
    rows = [{**row, "image_id": ids[benign[row.pop("image")]]} for row in result["per_image"]]
    return result["summary"], rows, result["examples"]


def localisation_summary(rows: list[dict], seed: int) -> dict:
    summary: dict = {"images": len(rows)}
    for measure in LOCALISATION_MEASURES:
        interval = mean_interval([row[measure] for row in rows], seed=seed)
        summary.update({measure: interval.value, f"{measure}_low": interval.low, f"{measure}_high": interval.high})
    summary["lesion_area"] = float(np.mean([row["lesion_area"] for row in rows])) if rows else math.nan
    return summary


def assemble_report(records: list[dict], checks, runs: list[dict]) -> dict:
    """audit.json: check -> run id -> method (artefacts: artefact kind) -> plain numbers. Faithfulness gets
    each run and method's rank by insertion minus deletion (1 = most faithful)."""
    report: dict = {check: {} for check in CHECKS if check in checks}
    for record in records:
        check, run_id, summary = record["check"], record["run_id"], record["summary"]
        if check not in report:
            continue
        if check == "artefacts":
            report[check][run_id] = dict(summary)
        elif check == "randomisation":
            report[check].setdefault(run_id, {})[record["method"]] = {**summary, "images": len(record["images"])}
        else:
            report[check].setdefault(run_id, {})[record["method"]] = dict(summary)
    if "localisation" in report:
        for run in runs:  # nothing to measure without masks: null numbers, 0 images
            for method in {r["method"] for r in records if r["run_id"] == run["run_id"]} or set():
                report["localisation"].setdefault(run["run_id"], {}).setdefault(
                    method, {**{m: None for m in LOCALISATION_MEASURES}, "lesion_area": None, "images": 0})
    if "faithfulness" in report:
        entries = [(summary["score"], run_id, method) for run_id, methods in report["faithfulness"].items()
                   for method, summary in methods.items() if summary.get("score") is not None
                   and math.isfinite(summary["score"])]
        for rank, (_, run_id, method) in enumerate(sorted(entries, reverse=True), start=1):
            report["faithfulness"][run_id][method]["rank"] = rank
    return report


def latest_stored_audit(store: RunStore, runs: list[dict], methods: tuple[str, ...] | None = None) -> Audit:
    """The newest stored result of every check for each run (and method): what the Audit page shows at once,
    without recomputing anything."""
    records = []
    for run in runs:
        folder = store.root / run["run_id"]
        seen = set()
        for record in audit_store.stored_results(folder):
            # One artefact test per run (it uses one method for its maps); the other checks per method.
            slot = (record["check"], None if record["check"] == "artefacts" else record["method"])
            if slot in seen or (methods and record["check"] != "artefacts" and record["method"] not in methods):
                continue
            seen.add(slot)
            records.append(record)
    present = tuple(check for check in CHECKS if any(record["check"] == check for record in records))
    return Audit(runs=runs, records=records, report=assemble_report(records, present, runs), reused=len(records))
