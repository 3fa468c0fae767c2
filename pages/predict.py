"""Predict page: the stored runs on images without labels (several uploads, or a folder on the server):
P(malignant), each run's decision at its own threshold, and a flag where an image is unlike the run's
training images. A few images run at once; more run in the background queue."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.config import DataSpec, TrainConfig
from core.data.datasets import DatasetError, check_allowed
from core.evaluation.ood import COVERAGE
from core.evaluation.predict import PredictionResult, image_files, predict_images, predict_uploads
from core.runs import RunStore
from pages.common import (
    PREDICT_JOB,
    PREDICT_RESULT,
    PREDICT_RUNS,
    cached_ood_detector,
    choose_model_runs,
    job_progress_and_stop,
    persistent,
    require_admin_page,
    require_entrypoint,
    rerun_when_queue_changes,
    run_store,
    runs_with_models,
    session_job,
    shared_job_queue,
)

INLINE_IMAGES = 24  # more images than this run in the background queue, where the page stays usable
SOURCES = ["Upload images", "Folder on the server"]
OOD_STYLE = "background-color: #f6d7b0"
SHOWN_COLUMNS = {"image": "Image", "model": "Model", "prob_malignant": "P(malignant)", "threshold": "Threshold",
                 "decision": "Decision", "ood_score": "OOD score", "ood_threshold": "OOD threshold",
                 "out_of_distribution": "Unlike training images", "run_id": "Run", "path": "Path"}


def chosen_images() -> tuple[list[tuple[str, bytes]] | None, list[str] | None, str]:
    """(uploads, folder files, problem): one of the first two, or neither and why."""
    source = persistent(st.radio, "Images", "predict_source", SOURCES[0], options=SOURCES, horizontal=True)
    if source == SOURCES[0]:
        uploads = st.file_uploader("Dermoscopic images (JPEG or PNG), several at once", type=["jpg", "jpeg", "png"],
                                   accept_multiple_files=True, key="predict.uploads")
        return [(upload.name, upload.getvalue()) for upload in uploads or []], None, ""
    folder = persistent(st.text_input, "Folder of images on the server", "predict_folder", "",
                        placeholder="/data/new-photos", help="Every JPEG/PNG under it, sub-folders included.").strip()
    if not folder:
        return None, None, ""
    try:
        check_allowed(folder)  # a classroom deployment keeps viewers inside its data folders
        paths = [str(path) for path in image_files(folder)]
    except (DatasetError, ValueError, OSError) as error:
        return None, None, f"The folder cannot be used: {error}."
    st.caption(f"{len(paths)} image file(s) in {folder}.")
    return None, paths, ""


def known_detectors(store: RunStore, runs: list[dict]) -> dict:
    """The runs' OOD detectors this server already holds (fitted and stored on first use)."""
    detectors = {}
    for run in runs:
        version = store.model_path(run["run_id"]).stat().st_mtime
        detector, _ = cached_ood_detector(str(store.root), run["run_id"], version)
        if detector is not None:
            detectors[run["run_id"]] = detector
    return detectors


def predict_now(store: RunStore, runs: list[dict], uploads, paths) -> None:
    """A few images: predicted here, with a spinner."""
    count = len(uploads) if uploads is not None else len(paths)
    detectors = known_detectors(store, runs)
    with st.spinner(f"Predicting {count} image(s) with {len(runs)} run(s) ..."):
        try:
            result = (predict_uploads(runs, store, uploads, detectors=detectors) if uploads is not None
                      else predict_images(runs, store, paths, detectors=detectors))
        except ValueError as error:
            st.error(f"Cannot predict: {error}.")
            return
    st.session_state[PREDICT_RESULT] = result
    st.session_state.pop(PREDICT_JOB, None)


def queue_prediction(runs: list[dict], uploads, paths) -> int:
    """Many images: a background job whose result the page shows when it ends."""
    store, run_ids = run_store(), [run["run_id"] for run in runs]
    count = len(uploads) if uploads is not None else len(paths)

    def task(stop, callback):
        checked = [store.load(run_id) for run_id in run_ids]
        if any(run is None for run in checked):
            return "failed", "a chosen run was deleted since the page was drawn"

        def report(done: int, total: int, text: str) -> None:
            callback.on_progress(done, total, text)

        try:
            result = (predict_uploads(checked, store, uploads, report, stop) if uploads is not None
                      else predict_images(checked, store, paths, report, stop))
        except InterruptedError:
            return "stopped", "stopped by request; nothing of it was kept"
        except ValueError as error:
            return "failed", str(error)
        callback.on_result(result)
        return "completed", None

    config = TrainConfig.from_dict(runs[0].get("config") or {})
    label = f"Predict {count} image(s) with {len(runs)} run(s)"
    return shared_job_queue().submit_task(label, config, DataSpec(), task, kind="predict")


def launch(store: RunStore, runs: list[dict]) -> None:
    uploads, paths, problem = chosen_images()
    if problem:
        st.error(problem)
    count = len(uploads) if uploads is not None else len(paths) if paths is not None else 0
    background = count > INLINE_IMAGES
    if background:
        st.caption(f"{count} images: the prediction runs in the background queue; the table appears here when it "
                   "ends.")
    if st.button("Predict", key="predict.start", type="primary", icon=":material/batch_prediction:",
                 disabled=not runs or not count):
        if background:
            job = queue_prediction(runs, uploads, paths)
            if job is None:
                return  # refused (queue limit): the reason is shown
            st.session_state[PREDICT_JOB] = job
            st.session_state.pop(PREDICT_RESULT, None)
            st.toast("Queued: the prediction runs in the background queue (progress below).")
            st.rerun()
        predict_now(store, runs, uploads, paths)


@st.fragment(run_every=2.0)
def live() -> None:
    job_progress_and_stop("predict", "predict", "a prediction started here will start after it")
    rerun_when_queue_changes("predict")


def shown_result() -> PredictionResult | None:
    job = session_job(PREDICT_JOB)
    if job is not None and not job.active:
        if job.state == "failed":
            st.error(f"The prediction failed: {job.error}")
        elif job.state == "stopped":
            st.info(f"The prediction was stopped: {job.error}.")
        if isinstance(job.result, PredictionResult):
            return job.result
    if job is not None and job.active:
        return None
    return st.session_state.get(PREDICT_RESULT)


def show_result(result: PredictionResult) -> None:
    table = result.table
    columns = st.columns(4)
    columns[0].metric("Images", result.images)
    columns[1].metric("Runs", table["run_id"].nunique() if not table.empty else 0)
    columns[2].metric("Skipped (unreadable)", len(result.skipped))
    columns[3].metric("Rows unlike training images", int(table["out_of_distribution"].sum()) if not table.empty
                      else 0)
    for warning in result.warnings():
        st.warning(warning[0].upper() + warning[1:] + ".", icon="⚠️")
    for note in result.notes:
        st.info(note[0].upper() + note[1:] + ".")
    if result.skipped:
        with st.expander(f"{len(result.skipped)} file(s) skipped"):
            st.dataframe(pd.DataFrame(result.skipped, columns=["File", "Why"]), hide_index=True, width="stretch",
                         key="predict.skipped")
    if table.empty:
        return
    shown = table[[column for column in SHOWN_COLUMNS if column != "path" or table["path"].ne("").any()]]
    styled = (shown.style.apply(lambda row: [OOD_STYLE if row["out_of_distribution"] else ""] * len(row), axis=1)
              .format({"prob_malignant": "{:.3f}", "threshold": "{:.2f}", "ood_score": "{:.2f}",
                       "ood_threshold": "{:.2f}"}, na_rep="—"))
    height = 35 * (min(len(shown), 20) + 1) + 3  # up to 20 rows without scrolling (Streamlit's rows are 35 px)
    st.dataframe(styled, hide_index=True, width="stretch", key="predict.table", height=height,
                 column_config={column: st.column_config.Column(title) for column, title in SHOWN_COLUMNS.items()})
    st.caption("Shaded rows: the image is unlike the run's training images. The OOD score is the Mahalanobis "
               "distance of the model's features of the image to those of its training images, at every stage of "
               "the network (Lee et al. 2018), standardised so that about 0 is typical of the run's own validation "
               f"images; the threshold is the score {COVERAGE:.0%} of them stay below. Such a model has not seen "
               "images like it: treat its P(malignant) with caution. Each decision is taken at its run's own "
               "threshold.")
    st.download_button("Download the table (CSV)", table.to_csv(index=False), file_name="predictions.csv",
                       mime="text/csv", key="predict.download", icon=":material/download:", on_click="ignore")


def main() -> None:
    require_entrypoint()
    require_admin_page("Predict")
    st.title("Predict")
    st.caption("The stored runs on new images without labels: P(malignant), each run's decision at its own "
               "threshold, and a flag where an image is unlike the images the model was trained on.")
    store = run_store()
    available = runs_with_models(store)
    if not available:
        st.info("No trained runs yet. Train models first; their stored models predict here.")
        st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")
        live()
        return
    runs = choose_model_runs(available, PREDICT_RUNS, "applied")
    launch(store, runs)
    live()
    result = shown_result()
    if result is not None:
        show_result(result)


main()
