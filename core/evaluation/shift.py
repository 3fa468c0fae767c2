"""Dataset shift: the same runs judged on their own test part and on an external set, side by side.

Both comparisons are built at one operating point, so each model's threshold is the one chosen on its
internal validation part; the external sensitivity and specificity are what that threshold gives on
another clinic's images, which is the number a deployment would actually meet.
"""

from __future__ import annotations

import pandas as pd

from core import figures
from core.evaluation.compare import Comparison
from core.evaluation.external import auc_shift
from core.formatting import format_interval
from core.stats.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, calibration

# (column of the comparison table, title in the shift table)
SHIFTED_METRICS = (("AUC", "AUC"), ("Recall", "Sensitivity"), ("Specificity", "Specificity"))


def shift_rows(internal: Comparison, external: Comparison, resamples: int = DEFAULT_RESAMPLES,
               seed: int = DEFAULT_SEED) -> list[dict]:
    """One dict per run present in both comparisons: the threshold, each SHIFTED_METRICS value with its
    interval internally and externally, and the AUC difference with its 95% interval."""
    internal_rows = {row["Run"]: row for row in internal.table.to_dict("records")}
    internal_entries = {entry.run["run_id"]: entry for entry in internal.entries}
    rows = []
    for entry, row in zip(external.entries, external.table.to_dict("records")):
        run_id = entry.run["run_id"]
        if run_id not in internal_rows:
            continue
        inside = internal_rows[run_id]
        result = {"model": entry.name, "run": run_id, "threshold": float(row["Threshold"])}
        for column, title in SHIFTED_METRICS:
            key = title.lower()
            for part, source in (("internal", inside), ("external", row)):
                result[f"{key}_{part}"] = float(source[column])
                result[f"{key}_{part}_low"] = float(source[f"{column} low"])
                result[f"{key}_{part}_high"] = float(source[f"{column} high"])
        own = internal_entries[run_id].test
        shift = auc_shift(own["label"], own["prob_malignant"], entry.test["label"], entry.test["prob_malignant"],
                          resamples, seed)
        result.update(auc_change=shift.difference, auc_change_low=shift.low, auc_change_high=shift.high)
        rows.append(result)
    return rows


def shift_table(rows: list[dict]) -> pd.DataFrame:
    """The shift rows as text: value [95% CI] per metric, internal then external."""
    table = pd.DataFrame({"Model": [row["model"] for row in rows],
                          "Threshold (internal validation)": [f"{row['threshold']:.3f}" for row in rows]})
    for _, title in SHIFTED_METRICS:
        key = title.lower()
        for part in ("internal", "external"):
            table[f"{title} {part}"] = [format_interval(row[f"{key}_{part}"], row[f"{key}_{part}_low"],
                                                        row[f"{key}_{part}_high"]) for row in rows]
        if key == "auc":
            table["AUC change"] = [format_interval(row["auc_change"], row["auc_change_low"], row["auc_change_high"],
                                                   signed=True) for row in rows]
    return table


def shift_figures(internal: Comparison, external: Comparison, rows: list[dict], external_name: str) -> dict:
    """The shift view's figures by title: AUC with intervals, and calibration curves side by side."""
    auc_rows = [{"model": row["model"], **{f"{part}{suffix}": row[f"auc_{part}{suffix}"]
                                           for part in ("internal", "external") for suffix in ("", "_low", "_high")}}
                for row in rows]
    curves = []
    for comparison in (internal, external):
        part = []
        for entry in comparison.entries:
            calibrated = calibration(entry.test["label"], entry.test["prob_malignant"])
            part.append((entry.name, calibrated.bin_centres, calibrated.observed,
                         calibrated.expected_calibration_error))
        curves.append(part)
    return {"AUC, internal vs external": figures.auc_shift_figure(auc_rows),
            "Calibration, internal vs external": figures.calibration_shift_figure(curves[0], curves[1], external_name)}
