"""Tables that compare stored runs (the paper's Table 1 and Table 2, extended)."""

from __future__ import annotations

import pandas as pd

from core.config import MODEL_NAMES
from core.models import get_model_spec

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


def comparison_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run: model, run id, then COMPARISON_COLUMNS (NaN where a value is missing)."""
    rows = []
    for run in runs:
        metrics = run.get("metrics") or {}
        row = {"Model": get_model_spec(run["model"]).display_name, "Run": run["run_id"]}
        for title, block, name in COMPARISON_COLUMNS:
            value = (metrics.get(block) or {}).get(name)
            row[title] = float("nan") if value is None else float(value)
        rows.append(row)
    return pd.DataFrame(rows, columns=["Model", "Run", *(title for title, _, _ in COMPARISON_COLUMNS)])


def format_table(table: pd.DataFrame, style: str = "table") -> str:
    if style == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    if style == "latex":
        return table.drop(columns=["Run"]).to_latex(index=False, float_format="%.4f", na_rep="--")
    return table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="--")
