"""Audit page: do the explanation maps show what the models learnt? The stored runs' maps checked four ways
(randomisation sanity check, artefact shortcuts, localisation, faithfulness), run in the background queue;
stored results are shown at once, and reused rather than computed again."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.audit import summary
from core.audit.artefacts import ARTEFACT_KINDS
from core.audit.faithfulness import BASELINES
from core.audit.maps import AUDIT_METHODS, CONTROL_METHODS, method_display_name
from core.audit.outputs import (
    artefact_examples,
    artefact_table,
    faithfulness_table,
    localisation_table,
    randomisation_table,
)
from core.audit.randomisation import DEFAULT_STEPS
from core.audit.runner import (
    CHECK_NAMES,
    CHECKS,
    Audit,
    AuditSettings,
    check_runs,
    latest_stored_audit,
    planned_steps,
    run_audit,
)
from core.cams import default_run_method
from core.config import DataSpec, TrainConfig
from core.data.datasets import DatasetError, check_allowed
from core.figures import artefact_heatmap_figure, audit_localisation_figure, faithfulness_figure, randomisation_figure
from core.models import get_model_spec
from core.runs import RunStore
from pages.common import (
    AUDIT_JOB,
    AUDIT_RUNS,
    can_administer,
    choose_model_runs,
    job_progress_and_stop,
    persistent,
    require_entrypoint,
    rerun_when_queue_changes,
    run_store,
    runs_with_models,
    session_job,
    shared_job_queue,
    waiting_for_runs,
)

FAILS_STYLE = "background-color: #b5483b; color: white; font-weight: bold"
NO_VERDICT_STYLE = "color: #777; font-style: italic"
EXAMPLE_TILE = 112  # pixels per image of the before/after grid


def audit_label(runs: list[dict]) -> str:
    return f"Audit of {len(runs)} run(s)"


def settings_widgets(default_method: str) -> tuple[AuditSettings | None, str]:
    """The audit's settings from the widgets, or None and why they cannot be used. The methods start from the
    one the Explain page shows for these runs."""
    left, right = st.columns([2, 3])  # the checks' four chips need the room
    methods = persistent(left.multiselect, "Methods", "audit_methods", [default_method], options=list(AUDIT_METHODS),
                         format_func=method_display_name,
                         help="The CAM methods to audit. 'Image edges' is a control that ignores the model: a sound "
                              "randomisation check flags it as FAILS.")
    checks = persistent(right.multiselect, "Checks", "audit_checks", list(CHECKS), options=list(CHECKS),
                        format_func=str.capitalize, help="; ".join(CHECK_NAMES[check] for check in CHECKS) + ".")
    if set(methods) & set(CONTROL_METHODS):
        left.caption("Image edges is a control: its maps come from the image alone, so the sanity check must fail "
                     "it. If it passes, the check itself is not sensitive enough.")
    columns = st.columns(4)
    images = persistent(columns[0].number_input, "Test images per run", "audit_images", 50, min_value=2,
                        max_value=2000, step=10, help="Drawn from each run's test part with the seed; the same "
                                                      "images for every run on the same data and split.")
    seed = persistent(columns[1].number_input, "Seed", "audit_seed", 0, min_value=0, max_value=2**31 - 1, step=1)
    steps = persistent(columns[2].number_input, "Randomisation steps", "audit_steps", DEFAULT_STEPS, min_value=2,
                       max_value=8, step=1, help="From the head alone to the whole network randomised.")
    baseline = persistent(columns[3].selectbox, "Faithfulness baseline", "audit_baseline", "blur",
                          options=list(BASELINES), format_func=lambda name: summary.BASELINE_NAMES.get(name, name),
                          help="What removed pixels are replaced with in the deletion and insertion curves.")
    road = persistent(st.checkbox, "Add ROAD to faithfulness (slow: about 1 s per image and model)", "audit_road",
                      False, help="ROAD (Rong et al. 2022) removes pixels by imputing them from their neighbours, "
                                  "which leaks less of the map's shape than a fixed baseline.")
    masks = persistent(st.text_input, "Lesion masks folder (optional)", "audit_masks", "",
                       placeholder="default: the dataset's own masks (the synthetic set always has them)",
                       help="PNG masks named <image_id>_segmentation.png, <image_id>_mask.png or "
                            "<image_id>_<suffix>.png; used for localisation and to keep artefacts off the lesion.")
    masks = masks.strip()
    if masks:
        try:
            check_allowed(masks)  # a classroom deployment keeps viewers inside its data folders
        except DatasetError as error:
            return None, f"The masks folder cannot be used: {error}."
        if not Path(masks).is_dir():
            return None, f"The masks folder {masks} does not exist or is not a folder."
    try:
        settings = AuditSettings(methods=tuple(methods), checks=tuple(checks), images=int(images), seed=int(seed),
                                 steps=int(steps), baseline=baseline, artefacts=ARTEFACT_KINDS, masks_dir=masks or None,
                                 road=bool(road))
    except ValueError as error:
        return None, f"Cannot audit with these settings: {error}."
    return settings, ""


def start_audit(runs: list[dict], settings: AuditSettings) -> int | None:
    """Queue the audit; its task reports `done` of `total` steps and which run it is on."""
    store, run_ids = run_store(), [run["run_id"] for run in runs]

    def task(stop, callback):
        try:
            checked = check_runs(store, run_ids)  # a run deleted since the page was drawn
            total, per_run = planned_steps(checked, settings), max(planned_steps(checked[:1], settings), 1)

            def on_run(index: int) -> str:
                return f"{get_model_spec(checked[index]['model']).display_name} (run {index + 1} of {len(checked)})"

            def report(done: int, total: int) -> None:  # the run of the next step: every run has as many
                callback.on_progress(done, total, on_run(min(done, total - 1) // per_run))

            callback.on_progress(0, total, on_run(0))
            audit = run_audit(store, checked, settings, report, stop)
        except InterruptedError:
            return "stopped", "stopped by request; the results finished before are stored and reused next time"
        except ValueError as error:
            return "failed", str(error)
        callback.on_result(audit)
        return "completed", None

    config = TrainConfig.from_dict(runs[0].get("config") or {})
    return shared_job_queue().submit_task(audit_label(runs), config, DataSpec(), task, kind="audit")


def start_blocker() -> str:
    """Why Run is disabled: the queue is busy (an audit waiting behind hours of training would look stuck)."""
    snapshot = shared_job_queue().snapshot()
    if snapshot.current is not None and snapshot.current.kind == "audit":
        return "An audit is running; its results appear here when it ends (or stop it below)."
    if snapshot.current is not None:
        return f"The queue is busy with {snapshot.current.busy_text()}; run the audit when it ends."
    if snapshot.queued:
        return f"{len(snapshot.queued)} job(s) are queued; run the audit when they have run."
    return ""


def launch(store: RunStore, runs: list[dict], settings: AuditSettings | None, problem: str) -> None:
    if problem:
        st.error(problem)
    elif runs:
        st.caption(summary.describe_plan(store, runs, settings))
    blocker = start_blocker()
    disabled = bool(blocker) or bool(problem) or not runs
    if st.button("Run audit", key="audit.start", type="primary", icon=":material/fact_check:", disabled=disabled,
                 help=blocker or None):
        try:
            check_runs(store, [run["run_id"] for run in runs])
        except ValueError as error:
            st.error(f"Cannot audit: {error}.")
            return
        job = start_audit(runs, settings)
        if job is None:
            return  # refused (a viewer's forged click, or the queue limit): the reason is shown
        st.session_state[AUDIT_JOB] = job
        st.toast("Queued: the audit runs in the background queue (progress below and on the Train page).")
        st.rerun()  # draws Run disabled, now that the audit is queued
    if blocker:
        st.caption(blocker)


@st.fragment(run_every=2.0)
def live() -> None:
    job_progress_and_stop("audit", "audit", "an audit started here will start after it")
    rerun_when_queue_changes("audit")


def shown_audit(store: RunStore, runs: list[dict]) -> Audit:
    """The audit this session just ran on these runs (reused results included, whatever newer results of
    other settings are stored), else the newest stored result of every check: what anyone sees at once."""
    job = session_job(AUDIT_JOB)
    if job is not None and not job.active:
        if job.state == "failed":
            st.error(f"The audit failed: {job.error}")
        elif job.state == "stopped":
            st.info(f"The audit was stopped: {job.error}.")
        audit = job.result
        if isinstance(audit, Audit) and [run["run_id"] for run in audit.runs] == [run["run_id"] for run in runs]:
            st.success(f"Audit finished in {audit.seconds:.0f} s: {audit.computed} result(s) computed, "
                       f"{audit.reused} reused from the run store.", icon=":material/fact_check:")
            for note in audit.notes:
                st.caption(f"Note: {note}.")
            return audit
    return latest_stored_audit(store, runs)


def show_randomisation(audit: Audit) -> None:
    table = summary.sanity_display(audit)
    verdicts = table.style.map(lambda value: FAILS_STYLE if value == "FAILS" else NO_VERDICT_STYLE
                               if value == summary.NO_VERDICT else "", subset=["Verdict"])
    st.dataframe(verdicts, hide_index=True, width="stretch", key="audit.sanity", height=table_height(table))
    if (table["Verdict"] == summary.NO_VERDICT).any():
        st.caption("No verdict: the trained model's maps were all zero on the audited images, so there was nothing "
                   "to compare after randomisation.")
    st.plotly_chart(randomisation_figure(randomisation_table(audit), summary.fail_threshold(audit)),
                    width="stretch", key="audit.randomisation")


def table_height(table) -> int:
    """Tall enough to show every row without scrolling (Streamlit's rows are 35 px), up to 30 rows."""
    return 35 * (min(len(table), 30) + 1) + 3


def show_artefacts(audit: Audit) -> None:
    st.plotly_chart(artefact_heatmap_figure(artefact_table(audit)), width="stretch", key="audit.artefact_heatmap")
    examples = artefact_examples(audit)
    if examples is not None:
        st.image(examples, caption="One benign test image without and with each artefact, and each model's "
                                   "malignant-class map of it (P = the model's P(malignant) of that image).")
    table = summary.artefact_display(audit)
    st.dataframe(table, hide_index=True, width="stretch", key="audit.artefacts", height=table_height(table))


def show_localisation(audit: Audit) -> None:
    st.dataframe(summary.localisation_display(audit), hide_index=True, width="stretch", key="audit.localisation")
    table = localisation_table(audit)
    st.plotly_chart(audit_localisation_figure(table), width="stretch", key="audit.localisation_figure")
    st.caption(f"The lesions cover {table['lesion_area'].mean():.0%} of the audited images on average.")


def show_faithfulness(audit: Audit) -> None:
    st.caption(summary.baseline_line(audit))
    st.dataframe(summary.faithfulness_display(audit), hide_index=True, width="stretch", key="audit.faithfulness")
    st.plotly_chart(faithfulness_figure(faithfulness_table(audit)), width="stretch", key="audit.faithfulness_figure")


SECTIONS = {"randomisation": show_randomisation, "artefacts": show_artefacts, "localisation": show_localisation,
            "faithfulness": show_faithfulness}


def show_results(audit: Audit) -> None:
    if not audit.records:
        st.info("Not audited yet: no audit results are stored for these runs. Run the audit above; its results "
                "are stored with each run and shown here to every visitor.", icon=":material/info:")
        return
    for check, show in SECTIONS.items():
        st.subheader(CHECK_NAMES[check])
        if not audit.records_of(check):
            st.caption(summary.missing_text(check))
            continue
        st.caption(f"{summary.computed_on(audit, check)} {summary.reading(check, audit)}")
        show(audit)
    downloads(audit)


def downloads(audit: Audit) -> None:
    st.subheader("Downloads")
    with st.container(horizontal=True):  # buttons as wide as their names, wrapping when they do not fit
        for name, content, mime in summary.audit_files(audit):
            st.download_button(name, content, file_name=name, mime=mime, key=f"audit.download.{name}",
                               icon=":material/download:", on_click="ignore")
    st.caption("audit.json: every number above; settings.json: which images, seed and settings each result used; "
               "the CSVs: one row per image (as `python -m core audit --out DIR` writes them).")


def main() -> None:
    require_entrypoint()
    st.title("Audit")
    st.caption("Do the explanation maps show what the models learnt? Four checks of the stored runs' maps: the "
               "randomisation sanity check (Adebayo et al. 2018), artefact shortcuts, localisation against the "
               "lesion masks and faithfulness (deletion and insertion).")
    store = run_store()
    available = runs_with_models(store)
    if not available:
        waiting_for_runs()
        live()  # an audit queued before the runs were deleted still shows its progress
        return
    runs = choose_model_runs(available, AUDIT_RUNS, "audited")
    if can_administer():  # viewers see the stored results; the teacher runs audits
        settings, problem = settings_widgets(default_run_method(runs))
        launch(store, runs, settings, problem)
    live()
    if not runs:
        st.info("Choose at least one run to see or run its audit.")
        return
    show_results(shown_audit(store, runs))


main()
