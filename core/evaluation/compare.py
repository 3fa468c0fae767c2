"""Tables that compare stored runs: the paper's Table 1 and Table 2, extended, with bootstrap
confidence intervals from each run's saved test predictions (no model is re-run)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from core import figures
from core.config import MODEL_NAMES
from core.evaluation.external import INTERNAL_TEST, external_predictions, stored_record
from core.formatting import format_p_value
from core.models import get_model_spec
from core.runs import RunStore, is_ordinary_run
from core.stats.metrics import compute_metrics, precision_recall_curve, predict_labels, roc_curve
from core.stats.uncertainty import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    bootstrap_metrics,
    calibration,
    delong_test,
    mcnemar_test,
    threshold_for_sensitivity,
)

# (column title, metrics block, metric name)
COMPARISON_COLUMNS = (
    ("Train acc", "train", "accuracy"),
    ("Test acc", "test", "accuracy"),
    ("Precision", "test", "precision"),
    ("Recall", "test", "recall"),
    ("F1", "test", "f1"),
    ("AUC", "test", "auc"),
    ("Specificity", "test", "specificity"),
    ("Kappa", "test", "kappa"),
    ("G-mean", "test", "g_mean"),
    # ISIC's own scores (core.stats.isic), titled by their ISIC names so that CSV columns match the scorers'
    ("auc_sens_80", "test", "auc_sens_80"),
    ("pauc_80", "test", "pauc_80"),
    ("average_precision", "test", "average_precision"),
)


def default_comparison_runs(runs: list[dict], dataset_fingerprint: str | None = None) -> list[dict]:
    """The newest completed ordinary run of each model (on one dataset, if given), in registry order.
    Tuning trials and ablation cells are never defaults: their recipes differ on purpose."""
    latest = {}
    for run in runs:  # newest first
        same_data = dataset_fingerprint is None or run.get("dataset", {}).get("fingerprint") == dataset_fingerprint
        if run.get("status") == "completed" and same_data and is_ordinary_run(run):
            latest.setdefault(run["model"], run)
    return [latest[name] for name in MODEL_NAMES if name in latest]


def tested_on_same_images(runs: list[dict]) -> bool:
    """True when every run has the same split fingerprint, so that paired comparisons are valid."""
    fingerprints = {(run.get("dataset") or {}).get("split_fingerprint") for run in runs}
    return len(fingerprints) <= 1 and None not in fingerprints


def comparison_table(runs: list[dict], store: RunStore, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """One row per run with readable predictions: Model, Run, then for each column of
    COMPARISON_COLUMNS its value and the bounds of its 95% bootstrap interval ('<title> low',
    '<title> high'; NaN for train accuracy, whose predictions are not stored)."""
    return paper_table(build_comparison(store, runs, resamples=resamples, seed=seed))


def paper_table(comparison: Comparison) -> pd.DataFrame:
    """The comparison's columns of the paper's Tables 1 and 2 (extended), with interval bounds."""
    columns = ["Model", "Run"] + [f"{title}{part}" for title, _, _ in COMPARISON_COLUMNS
                                  for part in ("", " low", " high")]
    return comparison.table.reindex(columns=columns)


def with_intervals_as_text(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """'0.9123 [0.8812, 0.9401]' per cell; a value without an interval is shown alone."""
    shown = table[["Model", "Run"]].copy()
    for title, _, _ in COMPARISON_COLUMNS:
        def cell(row, title=title):
            value, low, high = row[title], row[f"{title} low"], row[f"{title} high"]
            if not np.isfinite(value):
                return "--"
            return f"{value:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else "")
        shown[title] = table.apply(cell, axis=1) if len(table) else []
    return shown


def format_table(table: pd.DataFrame, style: str = "table") -> str:
    if style == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    shown = with_intervals_as_text(table)
    if style == "latex":
        return shown.drop(columns=["Run"]).to_latex(index=False)
    return shown.to_string(index=False)


# Columns of the page's and the report's table beyond COMPARISON_COLUMNS: (title, metric name).
EXTRA_COLUMNS = (("MCC", "mcc"), ("Balanced acc", "balanced_accuracy"))
SIGNIFICANCE = 0.05


@dataclass
class ModelPredictions:
    """One run's saved validation and test predictions, and the threshold it is judged at."""

    name: str
    run: dict
    val: pd.DataFrame
    test: pd.DataFrame
    threshold: float = 0.5


@dataclass
class Comparison:
    entries: list[ModelPredictions]
    table: pd.DataFrame  # Model, Run, Threshold, columns with ' low' / ' high' bounds, ECE, Brier
    paired: bool
    delong: np.ndarray | None = None  # pairwise p-values, None when the test images differ
    mcnemar: np.ndarray | None = None
    readings: list[str] = field(default_factory=list)
    operating_point: str = "each run's own decision threshold"
    target_sensitivity: float | None = None
    store: RunStore | None = None  # where the runs live: the report adds their stored explanation audit
    test_set: str = INTERNAL_TEST  # the runs' own test part, or the key of an external set
    test_set_name: str = "test"  # how figure titles and headings name it

    @property
    def external(self) -> bool:
        return self.test_set != INTERNAL_TEST


def describe_test_set(comparison: Comparison) -> str:
    """Which images the numbers are computed on, in words."""
    if comparison.external:
        return (f"{comparison.test_set_name.removeprefix('external: ')} images (an external set: every image, "
                "thresholds still chosen on each run's internal validation part)")
    return "runs' own test images"


def describe_operating_point(threshold: float | None, target_sensitivity: float | None) -> str:
    """The operating point in words, as the page, the CLI and the report state it."""
    if target_sensitivity is not None:
        return (f"sensitivity ≥ {target_sensitivity:.2f}: each model's threshold is the highest that reaches it "
                "on its validation predictions")
    if threshold is not None:
        return f"decision threshold {threshold:.2f} on P(malignant) for every model"
    return "each run's own decision threshold (its --threshold, 0.5 by default)"


def sensitivity_shortfalls(comparison: Comparison) -> list[tuple[str, float]]:
    """(model, test sensitivity) for the models whose test sensitivity fell below the target that
    their threshold reached on validation: a threshold chosen on one set does not carry over exactly."""
    if comparison.target_sensitivity is None:
        return []
    return [(row["Model"], float(row["Recall"])) for row in comparison.table.to_dict("records")
            if np.isfinite(row["Recall"]) and row["Recall"] < comparison.target_sensitivity]


def load_predictions(store: RunStore, runs: list[dict], names: list[str] | None = None,
                     test_set: str | None = None) -> list[ModelPredictions]:
    """The runs whose predictions.csv can be read (others are skipped), named by model unless `names`.
    `test_set` (an external set's key, see core.evaluation.external) replaces each run's own test part by
    its stored predictions on that set; validation stays the run's own, so thresholds are still chosen
    on internal data."""
    entries = []
    for index, run in enumerate(runs):
        try:
            predictions = store.predictions(run["run_id"])
            test = (predictions[predictions["split"] == "test"] if _is_internal(test_set)
                    else external_predictions(store, run["run_id"], test_set))
        except (OSError, ValueError):
            continue
        name = names[index] if names else get_model_spec(run["model"]).display_name
        if sum(entry.name == name for entry in entries):
            name = f"{name} ({run['run_id'][-4:]})"  # two runs of one model stay apart
        entries.append(ModelPredictions(name, run, predictions[predictions["split"] == "val"],
                                        test.sort_values("image_id"),
                                        float((run.get("config") or {}).get("threshold", 0.5))))
    return entries


def _is_internal(test_set: str | None) -> bool:
    return test_set in (None, "", INTERNAL_TEST)


def _external_name(store: RunStore, entries: list[ModelPredictions], key: str) -> str:
    record = stored_record(store, entries[0].run["run_id"], key) if entries else None
    return f"external: {(record or {}).get('name') or key}"


def build_comparison(store: RunStore, runs: list[dict], threshold: float | None = None,
                     target_sensitivity: float | None = None, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, names: list[str] | None = None,
                     test_set: str | None = None) -> Comparison:
    """Everything the Compare page and the HTML report show. With `target_sensitivity`, each model's
    threshold is the highest one reaching that sensitivity on its validation predictions. `test_set`:
    the runs' own test part (None) or the key of an external set they were all evaluated on."""
    entries = load_predictions(store, runs, names, test_set)
    for entry in entries:
        if target_sensitivity is not None:
            entry.threshold = threshold_for_sensitivity(entry.val["label"], entry.val["prob_malignant"],
                                                        target_sensitivity)
        elif threshold is not None:
            entry.threshold = threshold
    rows = [_comparison_row(entry, resamples, seed) for entry in entries]
    table = pd.DataFrame(rows)
    paired = len(entries) > 1 and all(
        entry.test["image_id"].tolist() == entries[0].test["image_id"].tolist() for entry in entries)
    comparison = Comparison(entries, table, paired, operating_point=describe_operating_point(
        threshold, target_sensitivity), target_sensitivity=target_sensitivity, store=store,
        test_set=INTERNAL_TEST if _is_internal(test_set) else test_set,
        test_set_name="test" if _is_internal(test_set) else _external_name(store, entries, test_set))
    if paired:
        comparison.delong, comparison.mcnemar = _pairwise_tests(entries)
        comparison.readings = _readings(entries, comparison.delong, comparison.mcnemar)
    return comparison


def _comparison_row(entry: ModelPredictions, resamples: int, seed: int) -> dict:
    labels, scores = entry.test["label"].to_numpy(), entry.test["prob_malignant"].to_numpy()
    intervals = bootstrap_metrics(labels, scores, entry.threshold, resamples, seed) if len(labels) else {}
    train = ((entry.run.get("metrics") or {}).get("train") or {}).get("accuracy")
    row = {"Model": entry.name, "Run": entry.run["run_id"], "Threshold": entry.threshold}
    for title, block, name in COMPARISON_COLUMNS + tuple((t, "test", n) for t, n in EXTRA_COLUMNS):
        interval = intervals.get(name) if block == "test" else None
        value = interval.value if interval else (math.nan if train is None else float(train))
        row.update({title: value, f"{title} low": interval.low if interval else math.nan,
                    f"{title} high": interval.high if interval else math.nan})
    calibrated = calibration(labels, scores) if len(labels) else None
    row["ECE"] = calibrated.expected_calibration_error if calibrated else math.nan
    row["Brier"] = calibrated.brier_score if calibrated else math.nan
    return row


def _pairwise_tests(entries: list[ModelPredictions]) -> tuple[np.ndarray, np.ndarray]:
    count = len(entries)
    delong, mcnemar = np.ones((count, count)), np.ones((count, count))
    labels = entries[0].test["label"].to_numpy()
    for i in range(count):
        for j in range(i + 1, count):
            a, b = entries[i], entries[j]
            auc_test = delong_test(labels, a.test["prob_malignant"], b.test["prob_malignant"])
            delong[i, j] = delong[j, i] = auc_test.p_value
            mcnemar[i, j] = mcnemar[j, i] = mcnemar_test(
                labels, predict_labels(a.test["prob_malignant"], a.threshold),
                predict_labels(b.test["prob_malignant"], b.threshold)).p_value
    return delong, mcnemar


def _readings(entries, delong: np.ndarray, mcnemar: np.ndarray) -> list[str]:
    """One line per test saying what the p-values mean at the 0.05 level."""
    lines = []
    for test_name, what, matrix in (("DeLong", "AUC", delong), ("McNemar", "accuracy", mcnemar)):
        pairs = [(entries[i].name, entries[j].name, matrix[i, j]) for i in range(len(entries))
                 for j in range(i + 1, len(entries)) if matrix[i, j] < SIGNIFICANCE]
        if not pairs:
            lines.append(f"{test_name}: no significant difference in {what} between any two models at "
                         f"{SIGNIFICANCE} (no correction for multiple comparisons).")
        else:
            listed = "; ".join(f"{a} vs {b} (p {_p_text(p)})" for a, b, p in pairs)
            lines.append(f"{test_name}: {what} differs significantly at {SIGNIFICANCE} for {listed} "
                         f"(uncorrected; with {len(entries) * (len(entries) - 1) // 2} comparisons, "
                         "expect some false alarms).")
    return lines


# The order of the page's and the report's table: what a reader looks for first stays at the left, so
# model, AUC, sensitivity and specificity are visible without scrolling sideways.
DISPLAY_ORDER = ("AUC", "Recall", "Specificity", "Test acc", "Precision", "F1", "Kappa", "G-mean", "MCC",
                 "Balanced acc", "auc_sens_80", "pauc_80", "average_precision", "ECE", "Brier", "Train acc")
DISPLAY_TITLES = {"Recall": "Sensitivity (recall)", "auc_sens_80": "AUC (sens ≥ 0.8, ISIC 2017–19)",
                  "pauc_80": "pAUC (TPR ≥ 0.8, ISIC 2024)", "average_precision": "Average precision"}
LOWER_IS_BETTER = {"ECE", "Brier"}
PAUC_NOTE = ("pAUC (TPR ≥ 0.8, ISIC 2024): the area under the ROC curve where sensitivity is at least 0.8; "
             "it runs from 0 to 0.2: 0.2 is a perfect model, 0.02 a random one. AUC (sens ≥ 0.8, ISIC 2017–19) "
             "is another area: under the whole curve to the right of where it first reaches sensitivity 0.8, "
             "from 0 to 1 (0.18 a random model), as the ISIC 2017–2019 challenges scored it.")


def display_table(comparison: Comparison) -> pd.DataFrame:
    """The comparison as text, one row per model: value and 95% interval per metric, in DISPLAY_ORDER."""
    table = comparison.table
    shown = pd.DataFrame({"Model": table["Model"], "Threshold": [f"{value:.3f}" for value in table["Threshold"]]})
    for column in DISPLAY_ORDER:
        lows = table[f"{column} low"] if f"{column} low" in table else [math.nan] * len(table)
        highs = table[f"{column} high"] if f"{column} high" in table else [math.nan] * len(table)
        shown[DISPLAY_TITLES.get(column, column)] = [
            "--" if not np.isfinite(v) else f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")
            for v, lo, hi in zip(table[column], lows, highs)]
    return shown


def best_in_column(comparison: Comparison) -> dict[str, np.ndarray]:
    """Display title -> which rows hold the best value of that metric (none with fewer than two runs)."""
    best = {}
    if len(comparison.table) < 2:
        return best
    for column in DISPLAY_ORDER:
        values = comparison.table[column].to_numpy(dtype=float)
        if np.isfinite(values).any():
            target = np.nanmin(values) if column in LOWER_IS_BETTER else np.nanmax(values)
            best[DISPLAY_TITLES.get(column, column)] = values == target
    return best


def per_image_table(comparison: Comparison) -> pd.DataFrame:
    """One row per test image of a paired comparison: image_id, true class, each model's P(malignant)
    (a column per model name), how many models call it malignant at their thresholds, whether they
    disagree, how many are wrong, the spread of P(malignant) across models, and the confidence of the
    most confident wrong call (its P, or 1 - P for a wrong benign call; 0 when no model is wrong)."""
    if not comparison.paired or not comparison.entries:
        return pd.DataFrame()
    first = comparison.entries[0].test
    labels = first["label"].to_numpy(dtype=int)
    table = pd.DataFrame({"image_id": first["image_id"].to_numpy(),
                          "true class": np.where(labels == 1, "malignant", "benign")})
    probabilities = np.column_stack([entry.test["prob_malignant"].to_numpy(dtype=float)
                                     for entry in comparison.entries])
    calls = np.column_stack([predict_labels(probabilities[:, index], entry.threshold)
                             for index, entry in enumerate(comparison.entries)])
    for index, entry in enumerate(comparison.entries):
        table[entry.name] = probabilities[:, index]
    wrong = calls != labels[:, None]
    confidence = np.where(calls == 1, probabilities, 1 - probabilities)
    table["called malignant"] = calls.sum(1)
    table["models disagree"] = (calls.min(1) != calls.max(1))
    table["models wrong"] = wrong.sum(1)
    table["spread"] = probabilities.max(1) - probabilities.min(1)
    table["worst mistake"] = np.where(wrong, confidence, 0.0).max(1)
    return table


IMAGE_FILTERS = ("All test images", "Models disagree at their thresholds", "Most confident mistakes",
                 "True benign", "True malignant")


def filter_images(table: pd.DataFrame, which: str, mistakes: int = 20) -> pd.DataFrame:
    """The rows of per_image_table one of IMAGE_FILTERS keeps; the confident mistakes come worst first."""
    if table.empty or which == "All test images":
        return table
    if which == "Models disagree at their thresholds":
        return table[table["models disagree"]].sort_values("spread", ascending=False)
    if which == "Most confident mistakes":
        return table[table["models wrong"] > 0].sort_values("worst mistake", ascending=False).head(mistakes)
    if which in ("True benign", "True malignant"):
        return table[table["true class"] == which.split()[1]]
    raise ValueError(f"unknown filter {which!r} (choose from {', '.join(IMAGE_FILTERS)})")


def _p_text(p_value: float) -> str:
    text = format_p_value(p_value)
    return text if text.startswith("<") else f"= {text}"


def comparison_figures(comparison: Comparison) -> dict[str, object]:
    """Every figure of the Compare page and the report, by title, built in core.figures."""
    entries, table = comparison.entries, comparison.table
    result = {}
    matrices = [(e.name, compute_metrics(e.test["label"], e.test["prob_malignant"], e.threshold)["confusion_matrix"])
                for e in entries]
    result["Confusion matrices (test)"] = figures.confusion_matrices_figure(matrices)
    curves, pr_curves = [], []
    for e in entries:
        labels, scores = e.test["label"].to_numpy(), e.test["prob_malignant"].to_numpy()
        if len(np.unique(labels)) < 2:
            continue
        roc = roc_curve(labels, scores)
        curves.append((e.name, roc["fpr"], roc["tpr"], float(table.set_index("Model").loc[e.name, "AUC"])))
        pr = precision_recall_curve(labels, scores)
        pr_curves.append((e.name, pr["recall"], pr["precision"], float(average_precision_score(labels, scores))))
    result["ROC curves"] = figures.roc_figure(curves)
    prevalence = float(entries[0].test["label"].mean()) if entries else None
    result["Precision-recall curves"] = figures.precision_recall_figure(pr_curves, prevalence)
    result["Sensitivity and specificity"] = figures.metric_bars_figure(
        table, [("Recall", "Sensitivity"), ("Specificity", "Specificity")], "Sensitivity and specificity (test)")
    result["All metrics"] = figures.metric_bars_figure(
        table, [("Test acc", "Accuracy"), ("Precision", "Precision"), ("Recall", "Recall"), ("F1", "F1"),
                ("AUC", "AUC")], "Accuracy, precision, recall, F1 and AUC (test)")
    result["Kappa and G-mean"] = figures.metric_bars_figure(
        table, [("Kappa", "Cohen's kappa"), ("G-mean", "G-mean")], "Cohen's kappa and G-mean (test)")
    result["Training curves"] = figures.compared_training_curves_figure(
        [(e.name, e.run.get("history") or []) for e in entries])
    reliability = []
    for e in entries:
        calibrated = calibration(e.test["label"], e.test["prob_malignant"])
        reliability.append((e.name, calibrated.bin_centres, calibrated.observed, calibrated.expected_calibration_error))
    result["Calibration"] = figures.reliability_figure(reliability)
    if comparison.paired:
        names = [e.name for e in entries]
        result["DeLong p-values (AUC)"] = figures.p_value_matrix_figure(names, comparison.delong,
                                                                        "DeLong test of AUC: p-values")
        result["McNemar p-values (accuracy)"] = figures.p_value_matrix_figure(names, comparison.mcnemar,
                                                                              "McNemar test of accuracy: p-values")
    if comparison.external:
        for figure in result.values():  # "(test)" in a title would claim the runs' own test part
            title = figure.layout.title.text or ""
            figure.update_layout(title=title.replace("(test)", f"({comparison.test_set_name})"))
    return result
