"""Compare page: every metric and plot of the chosen runs, with intervals and paired tests.
Reads each run's predictions.csv and run.json; no model is re-run."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.data.datasets import DatasetError
from core.evaluation.compare import (
    IMAGE_FILTERS,
    PAUC_NOTE,
    Comparison,
    best_in_column,
    build_comparison,
    comparison_figures,
    default_comparison_runs,
    display_table,
    filter_images,
    per_image_table,
)
from core.evaluation.report import report_html, shortfall_lines
from core.figures import BRUSH, PICKED, disagreement_scatter, probability_spread_chart
from core.runs import RunStore, is_ordinary_run, run_purpose
from pages.common import (
    DATA_SPEC,
    EXPLAIN_REQUEST,
    current_config,
    current_data_spec,
    persistent,
    prepared_for,
    require_entrypoint,
    run_choice_label,
    run_store,
)

SPREAD_ROWS = 60  # images the all-models view draws at once (one row each)


@st.cache_data(show_spinner="Bootstrapping intervals ...", max_entries=8)
def cached_comparison(runs_dir: str, run_ids: tuple[str, ...], threshold: float | None,
                      target_sensitivity: float | None) -> Comparison:
    store = RunStore(runs_dir)
    runs = [run for run in (store.load(run_id) for run_id in run_ids) if run is not None]
    return build_comparison(store, runs, threshold, target_sensitivity)


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
                            format_func=lambda run_id: run_choice_label(by_id[run_id]),
                            help="Default: the newest completed training run of each model on the dataset chosen "
                                 "on the Data page (or on the newest run's dataset). Tuning trials and ablation "
                                 "cells are listed by their purpose and never chosen by default.")
    st.caption(which_runs_line([by_id[run_id] for run_id in chosen], chosen == default))
    return [by_id[run_id] for run_id in chosen]


def which_runs_line(runs: list[dict], is_default: bool) -> str:
    """One line saying which runs the page compares and why."""
    if not runs:
        return ""
    dataset = (runs[0].get("dataset") or {}).get("name", "?")
    if is_default:
        return (f"Comparing the newest completed training run of each model on {dataset} (tuning trials and "
                "ablation cells only when you pick them).")
    tagged = [run_purpose(run) for run in runs if not is_ordinary_run(run)]
    return (f"Comparing the {len(runs)} run(s) you chose" + (f", including {'; '.join(tagged)}" if tagged else "")
            + ".")


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


def metrics_table(comparison: Comparison) -> None:
    shown, best = display_table(comparison), best_in_column(comparison)

    def highlight(_):
        styles = pd.DataFrame("", index=shown.index, columns=shown.columns)
        for title, rows in best.items():
            styles.loc[rows, title] = "background-color: #dcefe2; font-weight: bold"
        return styles

    # Model stays pinned and AUC, sensitivity and specificity come first: the columns a reader looks for
    # are visible without scrolling sideways.
    config = {"Model": st.column_config.TextColumn("Model", pinned=True, width="medium")}
    st.dataframe(shown.style.apply(highlight, axis=None), hide_index=True, width="stretch", key="compare.table",
                 column_config=config)
    st.caption("Intervals: 2,000 bootstrap resamples of the test images (seed 0), the same resamples for every "
               "model. Best value of each column highlighted. Train accuracy has no interval. " + PAUC_NOTE)


def exports(comparison: Comparison) -> None:
    shown = display_table(comparison)
    left, middle, right = st.columns(3)
    left.download_button("Table as CSV", comparison.table.to_csv(index=False, float_format="%.4f"),
                         file_name="comparison.csv", mime="text/csv", key="compare.csv")
    middle.download_button("Table as LaTeX", shown.to_latex(index=False), file_name="comparison.tex",
                           mime="text/x-tex", key="compare.latex")
    # The report inlines plotly.js (about 4 MB): built on request, not on every rerun of the page.
    if right.button("Build the HTML report", key="compare.build_report", icon=":material/description:"):
        report = report_html(comparison)
        right.download_button("Download the HTML report", report, file_name="comparison.html", mime="text/html",
                              key="compare.html", type="primary")


def picked_images(event, shown: pd.DataFrame, axes: tuple[str, str] | None = None) -> list[str]:
    """The image ids a click (point selection) or a box dragged over the two-model view's `axes`
    (interval selection) picked."""
    selection = (event or {}).get("selection") or {}
    ids = [point["image_id"] for point in selection.get(PICKED) or [] if "image_id" in point]
    box = selection.get(BRUSH) or {}
    if axes and "x" in box and "y" in box:
        inside = shown[axes[0]].between(*box["x"]) & shown[axes[1]].between(*box["y"])
        ids += shown.loc[inside, "image_id"].tolist()
    return list(dict.fromkeys(ids))


def image_explorer(comparison: Comparison) -> None:
    """Where the models disagree: per-image P(malignant), filtered, with picked images opened on Explain."""
    st.subheader("Where the models disagree")
    table = per_image_table(comparison)
    if table.empty:
        st.info("The per-image view needs runs tested on the same images.")
        return
    names = [entry.name for entry in comparison.entries]
    thresholds = {entry.name: entry.threshold for entry in comparison.entries}
    left, middle, right = st.columns([2, 1.4, 1.4])
    which = left.selectbox("Images", IMAGE_FILTERS, index=1, key="compare.explorer_filter")
    view = middle.radio("View", ["All models", "Two models"], horizontal=True, key="compare.explorer_view",
                        disabled=len(names) < 2)
    shown = filter_images(table, which)
    right.metric("Images shown", f"{len(shown)} of {len(table)}",
                 help=f"The models disagree at their thresholds on {int(table['models disagree'].sum())} images.")
    if shown.empty:
        st.info(f"No test image matches “{which}”.")
        return
    axes = None
    if view == "Two models" and len(names) >= 2:
        first, second = st.columns(2)
        model_x = first.selectbox("Horizontal", names, index=0, key="compare.explorer_x")
        model_y = second.selectbox("Vertical", names, index=1, key="compare.explorer_y")
        axes = (model_x, model_y)
        chart = disagreement_scatter(shown, model_x, model_y, thresholds[model_x], thresholds[model_y])
    else:
        shown = shown.head(SPREAD_ROWS)
        chart = probability_spread_chart(shown, names, thresholds)
        if len(filter_images(table, which)) > SPREAD_ROWS:
            st.caption(f"The first {SPREAD_ROWS} images of this filter are drawn; the table below lists them.")
    event = st.altair_chart(chart, on_select="rerun", key=f"compare.explorer_chart.{view}", width="stretch")
    picked = picked_images(event, shown, axes)
    columns = ["image_id", "true class", *names, "called malignant", "models wrong", "spread"]
    st.dataframe(shown[columns], hide_index=True, width="stretch", key="compare.explorer_table",
                 column_config={name: st.column_config.NumberColumn(format="%.3f") for name in [*names, "spread"]})
    caption = (f"{len(picked)} image(s) picked." if picked else
               "Click dots (shift-click for more) or drag a box in the two-model view to pick images.")
    st.caption(caption + " 'called malignant' counts the models whose P(malignant) reaches their threshold.")
    target = picked or shown["image_id"].head(20).tolist()
    label = f"Explain the {len(picked)} picked image(s)" if picked else f"Explain the first {len(target)} shown"
    if st.button(label, key="compare.explain_picked", icon=":material/visibility:"):
        st.session_state[EXPLAIN_REQUEST] = {"run_ids": [entry.run["run_id"] for entry in comparison.entries],
                                             "image_ids": target}
        st.switch_page("pages/explain.py")


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
    st.markdown(f"**Operating point:** {comparison.operating_point}.")
    for line in shortfall_lines(comparison):
        st.warning(line)
    metrics_table(comparison)
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
    image_explorer(comparison)


main()
