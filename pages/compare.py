"""Compare page: every metric and plot of the chosen runs, with intervals and paired tests.
Reads each run's predictions.csv and run.json; no model is re-run."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.config import FORMATS, DataSpec, TrainConfig
from core.data.datasets import DatasetError, detect_format
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
from core.evaluation.external import INTERNAL_TEST, EvaluationOutcome, ExternalSet, common_external_sets, evaluate_runs
from core.evaluation.shift import shift_figures, shift_rows, shift_table
from core.evaluation.subgroups import (
    comparison_dataset,
    comparison_subgroups,
    display_subgroup_table,
    subgroup_choices,
)
from core.figures import BRUSH, PICKED, disagreement_scatter, probability_spread_chart, subgroup_forest_figure
from core.report import report_html, shortfall_lines
from core.runs import RunStore, is_ordinary_run, run_purpose
from pages.common import (
    DATA_SPEC,
    EVALUATE_JOB,
    EXPLAIN_REQUEST,
    can_administer,
    current_config,
    current_data_spec,
    job_progress_and_stop,
    persistent,
    prepared_for,
    require_entrypoint,
    rerun_when_queue_changes,
    run_choice_label,
    run_store,
    session_job,
    shared_job_queue,
    waiting_for_runs,
)

SPREAD_ROWS = 60  # images the all-models view draws at once (one row each)


TEST_SET_KEY = "compare.test_set"  # the test-set selectbox (the evaluation sets it to the set it made)


@st.cache_data(show_spinner="Bootstrapping intervals ...", max_entries=8)
def cached_comparison(runs_dir: str, run_ids: tuple[str, ...], threshold: float | None,
                      target_sensitivity: float | None, test_set: str = INTERNAL_TEST) -> Comparison:
    store = RunStore(runs_dir)
    runs = [run for run in (store.load(run_id) for run_id in run_ids) if run is not None]
    return build_comparison(store, runs, threshold, target_sensitivity, test_set=test_set)


@st.cache_data(show_spinner="Bootstrapping the AUC change ...", max_entries=8)
def cached_shift(runs_dir: str, run_ids: tuple[str, ...], threshold: float | None, target_sensitivity: float | None,
                 test_set: str) -> list[dict]:
    internal = cached_comparison(runs_dir, run_ids, threshold, target_sensitivity)
    external = cached_comparison(runs_dir, run_ids, threshold, target_sensitivity, test_set)
    return shift_rows(internal, external)


def choose_test_set(store: RunStore, runs: list[dict]) -> ExternalSet | None:
    """The runs' own test part, or an external set every chosen run has been evaluated on."""
    available = common_external_sets(store, runs)
    labels = {INTERNAL_TEST: "The runs' own test part (internal)", **{item.key: item.describe() for item in available}}
    if st.session_state.get(TEST_SET_KEY) not in labels:
        st.session_state[TEST_SET_KEY] = INTERNAL_TEST  # a set the newly chosen runs lack
    key = st.selectbox("Test set", list(labels), format_func=labels.get, key=TEST_SET_KEY,
                       help="External sets are other labelled datasets every chosen run was evaluated on (below, or "
                            "`python -m core evaluate`). Thresholds chosen on validation still use each run's "
                            "internal validation part.")
    return next((item for item in available if item.key == key), None)


def start_evaluation(runs: list[dict], spec: DataSpec) -> int | None:
    """Queue the external evaluation; it reports runs done and which one it is on."""
    store, run_ids = run_store(), [run["run_id"] for run in runs]

    def task(stop, callback):
        try:
            present = [run for run in (store.load(run_id) for run_id in run_ids) if run is not None]
            outcome = evaluate_runs(store, present, spec, callback.on_progress, stop)
        except InterruptedError:
            return "stopped", "stopped by request; the runs evaluated before keep their stored predictions"
        except (DatasetError, ValueError, OSError) as error:
            return "failed", str(error)
        callback.on_result(outcome)
        return "completed", None

    config = TrainConfig.from_dict(runs[0].get("config") or {})
    label = f"Evaluation of {len(runs)} run(s) on {spec.source}"
    return shared_job_queue().submit_task(label, config, DataSpec(), task, kind="evaluate")


def evaluation_launcher(runs: list[dict], finished) -> None:
    """Another labelled dataset, in any supported format: every chosen run is applied to all of it. Only
    the admin points the server at a path; viewers see the evaluations already stored."""
    with st.expander("Evaluate on another dataset (external validation)", icon=":material/travel_explore:"):
        left, right = st.columns([3, 1])
        path = left.text_input("Dataset path", key="compare.external_path",
                               placeholder="/data/ham10000 or /data/derm7pt/labels.csv",
                               help="Any layout the Data page reads: class folders, HAM10000, or a CSV beside its "
                                    "images. Each run sees the images at its own size and normalisation.")
        data_format = right.selectbox("Format", ["auto", *[name for name in FORMATS if name != "synthetic"]],
                                      key="compare.external_format")
        if st.button(f"Evaluate the {len(runs)} chosen run(s)", key="compare.evaluate", icon=":material/play_arrow:",
                     disabled=not path.strip()):
            try:
                detect_format(path.strip())
            except DatasetError as error:
                st.error(f"Cannot evaluate on {path.strip()}: {error}")
                return
            spec = DataSpec(source=path.strip(), format=data_format)
            job = start_evaluation(runs, spec)
            if job is not None:  # else refused (queue limit): the reason is shown
                st.session_state[EVALUATE_JOB] = job
                st.toast("Queued: the evaluation runs in the background queue (progress below).")
        st.caption("Predictions are stored with each run and reused: evaluating again on the same files is instant.")
    live_evaluation()
    show_evaluation_outcome(finished)


@st.fragment(run_every=2.0)
def live_evaluation() -> None:
    job_progress_and_stop("evaluate", "compare", "an evaluation started here will start after it")
    rerun_when_queue_changes("compare")


def finished_evaluation():
    """The evaluation this session queued, once it has ended (then forgotten); a completed one makes its set
    the chosen test set. Called before the test-set selectbox is drawn, which may not be changed after."""
    job = session_job(EVALUATE_JOB)
    if job is None or job.active:
        return None
    st.session_state.pop(EVALUATE_JOB)
    if job.state == "completed" and isinstance(job.result, EvaluationOutcome):
        st.session_state[TEST_SET_KEY] = job.result.external.key
    return job


def show_evaluation_outcome(job) -> None:
    if job is None:
        return
    if job.state != "completed" or not isinstance(job.result, EvaluationOutcome):
        st.error(f"The evaluation {job.state}: {job.error}")
        return
    outcome = job.result
    st.success(f"Evaluated on {outcome.external.describe()}: {len(outcome.computed)} run(s) computed, "
               f"{len(outcome.reused)} reused, in {outcome.seconds:.0f} s. It is now the chosen test set.",
               icon=":material/travel_explore:")
    for warning in dict.fromkeys(outcome.warnings):
        st.warning(warning)
    if outcome.skipped:
        st.caption(f"{len(outcome.skipped)} unreadable or missing image(s) skipped, e.g. "
                   + ", ".join(image_id for image_id, _ in outcome.skipped[:3]) + ".")


def shift_view(store: RunStore, runs: list[dict], threshold, sensitivity, external: ExternalSet,
               config: dict) -> None:
    """Internal against external: AUC with intervals, calibration side by side, and the thresholds chosen
    on internal validation applied to the external images."""
    st.subheader(f"Shift: internal test part vs {external.name}")
    run_ids = tuple(run["run_id"] for run in runs)
    rows = cached_shift(str(store.root), run_ids, threshold, sensitivity, external.key)
    if not rows:
        return
    st.dataframe(shift_table(rows), hide_index=True, width="stretch", key="compare.shift_table")
    st.caption("Each model keeps the threshold chosen on its internal validation part (the operating point above); "
               "the external sensitivity and specificity are what that threshold gives on the external images. "
               "AUC change: external minus internal, 95% interval from independent bootstraps of the two sets.")
    internal = cached_comparison(str(store.root), run_ids, threshold, sensitivity)
    outside = cached_comparison(str(store.root), run_ids, threshold, sensitivity, external.key)
    for column, (name, figure) in zip(st.columns([2, 3]), shift_figures(internal, outside, rows,
                                                                       external.name).items()):
        column.plotly_chart(figure, width="stretch", config=config, key=f"compare.shift.{name}")


SUBGROUP_NAMES = {"sex": "Sex", "age": "Age band", "localization": "Body site (localization)",
                  "site": "Acquisition site (dataset)", "dx": "Diagnosis (dx)", "ita": "Skin tone (ITA)"}


@st.cache_data(show_spinner=False, max_entries=16)
def cached_subgroup_choices(spec: DataSpec) -> list[str]:
    return subgroup_choices(spec)


@st.cache_data(show_spinner="Measuring groups and bootstrapping intervals ...", max_entries=8)
def cached_subgroups(runs_dir: str, run_ids: tuple[str, ...], threshold: float | None,
                     target_sensitivity: float | None, test_set: str, by: str) -> pd.DataFrame:
    comparison = cached_comparison(runs_dir, run_ids, threshold, target_sensitivity, test_set)
    return comparison_subgroups(comparison, by, RunStore(runs_dir).cache_dir)


def subgroups_section(comparison: Comparison, threshold, sensitivity, config: dict) -> None:
    """Metrics per subgroup of the test images, as a forest plot and a table; computed when asked for."""
    st.subheader("Subgroups")
    try:
        choices = cached_subgroup_choices(comparison_dataset(comparison))
    except DatasetError as error:
        st.info(f"No subgroups: {error}.")
        return
    by = st.selectbox("Group the test images by", [None, *choices], key="compare.subgroups_by",
                      format_func=lambda key: "(choose a grouping)" if key is None else SUBGROUP_NAMES.get(key, key),
                      help="HAM10000's metadata, any categorical column of a CSV dataset, or skin tone by the "
                           "Individual Typology Angle measured on skin outside the lesion (very light > 55°, light, "
                           "intermediate, tan, brown, dark < −30°).")
    if by is None:
        st.caption("Metrics per group with 95% intervals and each group's gap to the whole set; groups with fewer "
                   "than 10 malignant or 10 benign images are marked too small to judge.")
        return
    run_ids = tuple(entry.run["run_id"] for entry in comparison.entries)
    try:
        table = cached_subgroups(str(run_store().root), run_ids, threshold, sensitivity, comparison.test_set, by)
    except (DatasetError, ValueError, OSError) as error:
        st.error(f"Cannot group by {by}: {error}")
        return
    st.plotly_chart(subgroup_forest_figure(table, f"AUC and sensitivity by {SUBGROUP_NAMES.get(by, by).lower()}"),
                    width="stretch", config=config, key="compare.subgroups_figure")
    st.dataframe(display_subgroup_table(table), hide_index=True, width="stretch", key="compare.subgroups_table")
    small = sorted(set(table.loc[table["too_small"] & (table["Group"] != "All"), "Group"]))
    st.caption("Gap: the group's value minus the model's value on the whole set. "
               + (f"Too small to judge (fewer than 10 malignant or 10 benign images): {', '.join(small)}."
                  if small else "Every group has at least 10 malignant and 10 benign images."))
    st.download_button("Subgroup table as CSV", table.to_csv(index=False, float_format="%.4f"),
                       file_name=f"subgroups-{by}.csv", mime="text/csv", key="compare.subgroups_csv", on_click="ignore")


def near_duplicate_badges(runs: list[dict]) -> None:
    """How many near-duplicate pairs cross each run's splits (recorded when it trained), as one row of badges."""
    badges = []
    for run in runs:
        record = (run.get("dataset") or {}).get("near_duplicates")
        name = run_choice_label(run).split(" · ")[0]
        if record is None:
            badges.append(f":gray-badge[:material/help: {name}: near-duplicates not checked]")
            continue
        crossing = int(record.get("cross_split_pairs", 0))
        badges.append(f":orange-badge[:material/warning: {name}: {crossing} near-duplicate pair(s) across splits]"
                      if crossing else f":green-badge[:material/check: {name}: no near-duplicates across splits]")
    st.markdown(" ".join(badges), help="Near-duplicate images (the same picture resized, recompressed or cropped) "
                "in both the training and the test side inflate test scores. Splits keep them together by default; "
                "`python -m core check-data PATH` lists them.")


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
    # on_click="ignore" on every download button: a click that reruns the page unlists the file until the rerun
    # draws the button again, and two runs of other sessions finishing meanwhile delete it, cancelling the
    # download (a class on one server; tests/test_pages.py checks every page's buttons).
    left.download_button("Table as CSV", comparison.table.to_csv(index=False, float_format="%.4f"),
                         file_name="comparison.csv", mime="text/csv", key="compare.csv", on_click="ignore")
    middle.download_button("Table as LaTeX", shown.to_latex(index=False), file_name="comparison.tex",
                           mime="text/x-tex", key="compare.latex", on_click="ignore")
    # The report inlines plotly.js (about 4 MB): built on request, not on every rerun of the page.
    if right.button("Build the HTML report", key="compare.build_report", icon=":material/description:"):
        report = report_html(comparison)
        right.download_button("Download the HTML report", report, file_name="comparison.html", mime="text/html",
                              key="compare.html", type="primary", on_click="ignore")


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
    if comparison.external:
        st.caption("Explain opens images of the runs' own datasets; choose the internal test part to open these.")
        return
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
        waiting_for_runs()
        return
    near_duplicate_badges(runs)
    threshold, sensitivity = threshold_widgets()
    finished = finished_evaluation()
    external = choose_test_set(store, runs)
    if can_administer():
        evaluation_launcher(runs, finished)
    else:
        live_evaluation()
    comparison = cached_comparison(str(store.root), tuple(run["run_id"] for run in runs), threshold, sensitivity,
                                   external.key if external else INTERNAL_TEST)
    if len(comparison.entries) < len(runs):
        st.warning(f"{len(runs) - len(comparison.entries)} run(s) have no readable predictions.csv and are left out.")
    if not comparison.entries:
        return
    if len(comparison.entries) > 1 and not comparison.paired:
        st.warning("These runs were tested on different images (other data, split or seed): the comparison is "
                   "not paired, so no significance tests are shown and differences mix models with test sets.")
    where = f"the {external.name} images (external)" if external else "the test images"
    st.subheader(f"Metrics on {where}, with 95% bootstrap intervals")
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
    if external is not None:
        shift_view(store, runs, threshold, sensitivity, external, config)
    subgroups_section(comparison, threshold, sensitivity, config)
    image_explorer(comparison)


main()
