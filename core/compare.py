"""Tables that compare stored runs: the paper's Table 1 and Table 2, extended, with bootstrap
confidence intervals from each run's saved test predictions (no model is re-run)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from core.config import MODEL_NAMES
from core.models import get_model_spec
from core.runs import RunStore
from core.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_metrics

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
)


def default_comparison_runs(runs: list[dict], dataset_fingerprint: str | None = None) -> list[dict]:
    """The newest completed run of each model (on one dataset, if given), in registry order."""
    latest = {}
    for run in runs:  # newest first
        same_data = dataset_fingerprint is None or run.get("dataset", {}).get("fingerprint") == dataset_fingerprint
        if run.get("status") == "completed" and same_data:
            latest.setdefault(run["model"], run)
    return [latest[name] for name in MODEL_NAMES if name in latest]


def test_predictions(store: RunStore, run: dict) -> pd.DataFrame | None:
    """The run's test rows of predictions.csv, or None when the file is missing or unreadable."""
    try:
        predictions = store.predictions(run["run_id"])
    except (OSError, ValueError):
        return None
    return predictions[predictions["split"] == "test"]


def tested_on_same_images(runs: list[dict]) -> bool:
    """True when every run has the same split fingerprint, so that paired comparisons are valid."""
    fingerprints = {(run.get("dataset") or {}).get("split_fingerprint") for run in runs}
    return len(fingerprints) <= 1 and None not in fingerprints


def comparison_table(runs: list[dict], store: RunStore | None = None, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """One row per run: Model, Run, then for each column of COMPARISON_COLUMNS its value and the
    bounds of its 95% bootstrap interval ('<title> low', '<title> high'; NaN where unavailable).
    Train accuracy has no interval: training predictions are not stored."""
    rows = []
    for run in runs:
        metrics = run.get("metrics") or {}
        threshold = float((run.get("config") or {}).get("threshold", 0.5))
        predictions = test_predictions(store, run) if store is not None and resamples > 0 else None
        intervals = (bootstrap_metrics(predictions["label"].to_numpy(), predictions["prob_malignant"].to_numpy(),
                                       threshold, resamples, seed)
                     if predictions is not None and len(predictions) else {})
        row = {"Model": get_model_spec(run["model"]).display_name, "Run": run["run_id"]}
        for title, block, name in COMPARISON_COLUMNS:
            interval = intervals.get(name) if block == "test" else None
            stored_value = (metrics.get(block) or {}).get(name)
            row[title] = interval.value if interval else (math.nan if stored_value is None else float(stored_value))
            row[f"{title} low"] = interval.low if interval else math.nan
            row[f"{title} high"] = interval.high if interval else math.nan
        rows.append(row)
    columns = ["Model", "Run"] + [f"{title}{part}" for title, _, _ in COMPARISON_COLUMNS
                                  for part in ("", " low", " high")]
    return pd.DataFrame(rows, columns=columns)


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
