"""Compare page: every metric and plot of the chosen runs, with intervals and paired tests.
Reads each run's predictions.csv and run.json; no model is re-run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.compare import (
    COMPARISON_COLUMNS,
    EXTRA_COLUMNS,
    Comparison,
    build_comparison,
    comparison_figures,
    default_comparison_runs,
)
from core.datasets import DatasetError
from core.models import get_model_spec
from core.report import write_html_report
from core.runs import RunStore
from pages.common import (
    DATA_SPEC,
    current_config,
    current_data_spec,
    persistent,
    prepared_for,
    require_entrypoint,
    run_store,
)

LOWER_IS_BETTER = {"ECE", "Brier"}


@st.cache_data(show_spinner="Bootstrapping intervals ...", max_entries=8)
def cached_comparison(runs_dir: str, run_ids: tuple[str, ...], threshold: float | None,
                      target_sensitivity: float | None) -> Comparison:
    store = RunStore(runs_dir)
    runs = [run for run in (store.load(run_id) for run_id in run_ids) if run is not None]
    return build_comparison(store, runs, threshold, target_sensitivity)


def run_label(run: dict) -> str:
    return f"{get_model_spec(run['model']).display_name} · {run['run_id']}"


def current_dataset_fingerprint(completed: list[dict]) -> str | None:
    """The dataset chosen on the Data page if runs exist on it, else the newest run's dataset."""
    fingerprints = [(run.get("dataset") or {}).get("fingerprint") for run in completed]
    if DATA_SPEC in st.session_state:  # only then is the prepared dataset already cached
        try:
            chosen = prepared_for(current_data_spec(), current_config()).fingerprint
        except (DatasetError, ValueError, OSError):
            chosen = None
        if chosen in fingerprints:
            return chosen
    return fingerprints[0] if fingerprints else None


def choose_runs(runs: list[dict]) -> list[dict]:
    completed = [run for run in runs if run.get("status") in ("completed", "stopped") and run.get("metrics")]
    default = [run["run_id"] for run in default_comparison_runs(completed, current_dataset_fingerprint(completed))]
    by_id = {run["run_id"]: run for run in completed}
    chosen = st.multiselect("Runs", list(by_id), default=default, key="compare.runs",
                            format_func=lambda run_id: run_label(by_id[run_id]),
                            help="Default: the newest completed run of each model on the dataset chosen on the "
                                 "Data page (or on the newest run's dataset).")
    return [by_id[run_id] for run_id in chosen]


def threshold_widgets() -> tuple[float | None, float | None]:
    mode = persistent(st.radio, "Operating point", "compare_mode", "Fixed threshold",
                      options=["Fixed threshold", "At sensitivity ≥ X"], horizontal=True,
                      help="At sensitivity ≥ X picks each model's threshold on its validation predictions "
                           "(the screening operating point) and reports test metrics there.")
    if mode == "Fixed threshold":
        threshold = persistent(st.slider, "Decision threshold on P(malignant)", "compare_threshold", 0.5,
                               min_value=0.01, max_value=0.99, step=0.01)
        return float(threshold), None
    sensitivity = persistent(st.slider, "Target sensitivity", "compare_sensitivity", 0.9, min_value=0.5,
                             max_value=0.99, step=0.01)
    return None, float(sensitivity)


def display_table(comparison: Comparison) -> pd.DataFrame:
    titles = [title for title, _, _ in COMPARISON_COLUMNS] + [title for title, _ in EXTRA_COLUMNS]
    table = comparison.table
    shown = table[["Model"]].copy()
    shown["Threshold"] = [f"{value:.3f}" for value in table["Threshold"]]
    for title in titles:
        shown[title] = [
            "--" if not np.isfinite(v) else f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")
            for v, lo, hi in zip(table[title], table[f"{title} low"], table[f"{title} high"])]
    for title in ("pAUC (sens >= 0.8)", "ECE", "Brier"):
        shown[title] = [f"{v:.3f}" if np.isfinite(v) else "--" for v in table[title]]
    return shown


def best_cells(comparison: Comparison, shown: pd.DataFrame) -> pd.DataFrame:
    """CSS per cell: the best value of each metric column is highlighted."""
    styles = pd.DataFrame("", index=shown.index, columns=shown.columns)
    if len(shown) < 2:
        return styles
    for column in shown.columns[2:]:
        values = comparison.table[column].to_numpy(dtype=float)
        if not np.isfinite(values).any():
            continue
        best = np.nanmin(values) if column in LOWER_IS_BETTER else np.nanmax(values)
        styles.loc[values == best, column] = "background-color: #dcefe2; font-weight: bold"
    return styles


def exports(comparison: Comparison) -> None:
    shown = display_table(comparison)
    left, middle, right = st.columns(3)
    left.download_button("Table as CSV", comparison.table.to_csv(index=False, float_format="%.4f"),
                         file_name="comparison.csv", mime="text/csv", key="compare.csv")
    middle.download_button("Table as LaTeX", shown.to_latex(index=False), file_name="comparison.tex",
                           mime="text/x-tex", key="compare.latex")
    # The report inlines plotly.js (about 4 MB): built on request, not on every rerun of the page.
    if right.button("Build the HTML report", key="compare.build_report", icon=":material/description:"):
        with tempfile.TemporaryDirectory() as folder:
            report = write_html_report(comparison, Path(folder) / "comparison.html").read_text(encoding="utf-8")
        right.download_button("Download the HTML report", report, file_name="comparison.html", mime="text/html",
                              key="compare.html", type="primary")


def main() -> None:
    require_entrypoint()
    st.title("Compare")
    store = run_store()
    runs = choose_runs(store.list_runs())
    if not runs:
        st.info("No completed runs to compare yet. Train models first (Train all five gives the paper's comparison).")
        st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")
        return
    threshold, sensitivity = threshold_widgets()
    comparison = cached_comparison(str(store.root), tuple(run["run_id"] for run in runs), threshold, sensitivity)
    if len(comparison.entries) < len(runs):
        st.warning(f"{len(runs) - len(comparison.entries)} run(s) have no readable predictions.csv and are left out.")
    if not comparison.entries:
        return
    if len(comparison.entries) > 1 and not comparison.paired:
        st.warning("These runs were tested on different images (other data, split or seed): the comparison is "
                   "not paired, so no significance tests are shown and differences mix models with test sets.")
    st.subheader("Metrics on the test images, with 95% bootstrap intervals")
    shown = display_table(comparison)
    st.dataframe(shown.style.apply(lambda _: best_cells(comparison, shown), axis=None), hide_index=True,
                 width="stretch", key="compare.table")
    st.caption("Intervals: 2,000 bootstrap resamples of the test images (seed 0), the same resamples for every "
               "model. Best value of each column highlighted. Train accuracy has no interval.")
    for line in comparison.readings:
        st.markdown(f"- {line}")
    exports(comparison)
    figures = comparison_figures(comparison)
    image_format = st.segmented_control("Figure download format (camera icon on each figure)", ["png", "svg"],
                                        default="png", key="compare.image_format") or "png"
    config = {"toImageButtonOptions": {"format": image_format, "scale": 2}, "displaylogo": False}
    layout = [["Confusion matrices (test)"], ["ROC curves", "Precision-recall curves"],
              ["Sensitivity and specificity", "Kappa and G-mean"], ["All metrics"], ["Training curves"],
              ["Calibration", "DeLong p-values (AUC)", "McNemar p-values (accuracy)"]]
    calibration_columns = comparison.table[["Model", "ECE", "Brier"]]
    for row in layout:
        present = [name for name in row if name in figures]
        for column, name in zip(st.columns(len(present)) if present else [], present):
            column.plotly_chart(figures[name], width="stretch", config=config, key=f"compare.{name}")
            if name == "Calibration":
                column.caption("Expected calibration error and Brier score (lower is better): " + "; ".join(
                    f"{m} {e:.3f} / {b:.3f}" for m, e, b in calibration_columns.itertuples(index=False)))


main()
