"""Explain page: where each of the five models looks, side by side, and whether that is the lesion."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core.cams import (
    CAM_METHODS,
    COLOUR_MAPS,
    CamExplainer,
    ExplainedImage,
    agreement_matrices,
    batch_measures,
    energy_inside,
    explain_image,
    explanation_panels,
    load_trained_model,
    pointing_game_hit,
)
from core.compare import default_comparison_runs
from core.config import DataSpec, TrainConfig
from core.datasets import DatasetError
from core.figures import labelled_grid, localisation_bars_figure, pairwise_matrix_figure
from core.images import ImageError, decode_image
from core.jobs import BackgroundTask
from core.models import get_model_spec
from core.runs import RunStore
from pages.common import current_data_spec, load_prepared, persistent, require_entrypoint, run_store

DISPLAY_SIZE = 224
MAX_UPLOAD_PIXELS = 40_000_000  # larger uploads are refused before decoding
BROWSE = ["All test images", "True benign", "True malignant", "Predicted benign", "Predicted malignant",
          "Right", "Wrong", "Most confident mistakes"]
TARGETS = {"Predicted class": "predicted", "Malignant": 1, "Benign": 0}
TASKS = "explain.tasks"  # background tasks of this session: slow CAM rows and batch measures, by key


@st.cache_resource(max_entries=10, show_spinner="Loading the model ...")
def cached_explainer(runs_dir: str, run_id: str, model_version: float) -> CamExplainer:
    """One explainer per run for the whole server: models are loaded once (Streamlit computes a missing
    entry once even when many sessions ask at the same moment); the explainer's lock keeps sessions that
    use it at the same time apart. `model_version` (model.pt's mtime) reloads a resumed run's model."""
    store = RunStore(runs_dir)
    run = store.load(run_id)
    return CamExplainer(load_trained_model(run, store.model_path(run_id)), run["model"])


def model_version(store: RunStore, run_id: str) -> float:
    return store.model_path(run_id).stat().st_mtime


def choose_runs(store: RunStore) -> list[dict]:
    runs = [run for run in store.list_runs() if run.get("status") in ("completed", "stopped")
            and store.model_path(run["run_id"]).exists()]
    by_id = {run["run_id"]: run for run in runs}
    default = [run["run_id"] for run in default_comparison_runs(runs)]
    chosen = st.multiselect("Runs", list(by_id), default=default, key="explain.runs",
                            format_func=lambda run_id: f"{get_model_spec(by_id[run_id]['model']).display_name} · "
                                                       f"{run_id}")
    return [by_id[run_id] for run_id in chosen]


def reference_data(store: RunStore, reference: dict):
    """The reference run's own dataset (the Data page's for runs that do not record theirs), split as
    the run split it, at display size (or None)."""
    config = TrainConfig.from_dict(reference.get("config") or {})
    recorded = (reference.get("dataset") or {}).get("spec")
    spec = DataSpec(**recorded) if recorded else current_data_spec()
    try:
        return load_prepared(spec, DISPLAY_SIZE, config.split, config.val_fraction, config.seed,
                             config.max_images, str(store.cache_dir))
    except (DatasetError, ValueError, OSError) as error:
        st.error(f"Cannot load the dataset of run {reference['run_id']}: {error}")
        return None


def browse_test_images(store: RunStore, reference: dict) -> tuple[np.ndarray, np.ndarray | None, str] | None:
    """A test image of the reference run's dataset, browsable by class, prediction and mistakes."""
    data = reference_data(store, reference)
    if data is None:
        return None
    predictions = store.predictions(reference["run_id"])
    test = predictions[predictions["split"] == "test"].set_index("image_id")
    test = test[test.index.isin(data.table["image_id"])]
    if test.empty:
        st.warning("The reference run's test images are not in its dataset as it loads now (moved, changed, or "
                   "a run that does not record its dataset and the Data page shows another one); upload an image.")
        return None
    called = (test["prob_malignant"] >= 0.5).astype(int)
    confidence_of_mistake = np.where(called != test["label"], (test["prob_malignant"] - 0.5).abs(), -1)
    filters = {
        "All test images": test.index, "True benign": test.index[test["label"] == 0],
        "True malignant": test.index[test["label"] == 1], "Predicted benign": test.index[called == 0],
        "Predicted malignant": test.index[called == 1], "Right": test.index[called == test["label"]],
        "Wrong": test.index[called != test["label"]],
        "Most confident mistakes": test.index[np.argsort(-confidence_of_mistake)][: int((confidence_of_mistake >= 0)
                                                                                           .sum())],
    }
    left, right = st.columns([1, 2])
    browse = left.selectbox("Show", BROWSE, key="explain.browse")
    candidates = list(filters[browse])
    if not candidates:
        right.info(f"No test images in '{browse}' for {get_model_spec(reference['model']).display_name}.")
        return None
    image_id = right.selectbox(f"Image ({len(candidates)})", candidates, key="explain.image_id",
                               format_func=lambda i: f"{i} · {'malignant' if test.loc[i, 'label'] else 'benign'} · "
                                                     f"P(malignant) {test.loc[i, 'prob_malignant']:.2f} by the "
                                                     "reference run")
    row = int(np.flatnonzero(data.table["image_id"].to_numpy() == image_id)[0])
    mask = data.masks[row] if data.masks is not None else None
    return data.images[row], mask, image_id


def uploaded_image() -> tuple[np.ndarray, None, str] | None:
    upload = st.file_uploader("A dermoscopic image (JPEG or PNG)", type=["jpg", "jpeg", "png"], key="explain.upload")
    if upload is None:
        return None
    try:
        with Image.open(io.BytesIO(upload.getvalue())) as probe:
            if probe.width * probe.height > MAX_UPLOAD_PIXELS:
                raise ImageError(f"image too large ({probe.width} x {probe.height} pixels)")
        image = decode_image(io.BytesIO(upload.getvalue()), DISPLAY_SIZE)
    except ImageError as error:
        st.error(f"Cannot use {upload.name}: {error}.")
        return None
    except Exception as error:  # noqa: BLE001 - whatever PIL raises on hostile bytes, the page goes on
        st.error(f"Cannot use {upload.name}: not a readable image ({type(error).__name__}).")
        return None
    return image, None, upload.name


def controls(has_mask: bool) -> dict:
    columns = st.columns(5)
    with columns[0]:
        method = persistent(st.selectbox, "CAM method", "cam_method", "gradcam", options=list(CAM_METHODS),
                            format_func=lambda m: CAM_METHODS[m].display_name + (" (slow)" if CAM_METHODS[m].slow
                                                                                 else ""))
    with columns[1]:
        target = persistent(st.selectbox, "Explain the class", "cam_target", "Predicted class", options=list(TARGETS))
    with columns[2]:
        opacity = persistent(st.slider, "Overlay opacity", "cam_opacity", 0.5, min_value=0.0, max_value=1.0,
                             step=0.05)
    with columns[3]:
        colour_map = persistent(st.selectbox, "Colour map", "cam_colour_map", "jet", options=list(COLOUR_MAPS))
    with columns[4]:
        shared = persistent(st.toggle, "Shared colour scale", "cam_shared_scale", False,
                            help="Scale the five maps together (by the largest) instead of each to its own maximum.")
        show_mask = persistent(st.toggle, "Lesion mask outline", "cam_show_mask", False, disabled=not has_mask)
    return {"method": method, "target": TARGETS[target], "opacity": opacity, "colour_map": colour_map,
            "shared": shared, "show_mask": show_mask and has_mask}


def show_row(explained, settings: dict) -> np.ndarray:
    panels = explanation_panels(explained, settings["opacity"], settings["colour_map"], settings["shared"],
                                settings["show_mask"])
    for column, (title, subtitle, images), result in zip(st.columns(len(panels)), panels, explained.results):
        column.markdown(f"**{title}**")
        column.caption(subtitle.replace("->", "→"))
        if result.all_zero:
            column.info("All-zero map: nothing in this image raises the score of the explained class "
                        "(common when explaining 'benign').")
        elif result.uniform:
            column.info("Uniform map: no location information (the model's last feature map is too small at "
                        "its training size).")
        column.image(images[0], width="stretch")
        column.image(images[1], width="stretch", caption="contours at 25/50/75% of the map")
    return labelled_grid(panels)


def show_measures(explained, names: list[str]) -> None:
    correlation, iou = agreement_matrices(explained.results)
    left, right = st.columns(2)
    left.plotly_chart(pairwise_matrix_figure(names, correlation, "Agreement: rank correlation of the maps", -1, 1),
                      width="stretch", key="explain.correlation")
    right.plotly_chart(pairwise_matrix_figure(names, iou, "Agreement: IoU of the top 20% of each map"),
                       width="stretch", key="explain.iou")
    if explained.mask is not None:
        rows = [{"Model": name, "CAM energy inside the lesion": energy_inside(r.cam, explained.mask),
                 "Pointing game (peak inside the lesion)":
                     "hit" if pointing_game_hit(r.cam, explained.mask) else "miss"}
                for name, r in zip(names, explained.results)]
        st.subheader("Localisation")
        st.caption(f"The lesion covers {explained.mask.mean():.0%} of the image: a map that ignores the lesion puts "
                   "about that share of its energy inside it.")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="explain.localisation",
                     column_config={"CAM energy inside the lesion": st.column_config.NumberColumn(format="%.2f")})


def background(key: tuple, function, *args) -> BackgroundTask:
    """This session's task for `key`, started on first request."""
    tasks = st.session_state.setdefault(TASKS, {})
    if key not in tasks:
        tasks[key] = BackgroundTask(function, *args)
    return tasks[key]


@st.fragment(run_every=1.0)
def wait_for(task: BackgroundTask, label: str) -> None:
    """A progress bar redrawn every second; the page reruns when the task ends."""
    if task.finished:
        st.rerun(scope="app")
    st.progress(task.fraction, text=f"{label}: {task.fraction:.0%}")
    if st.button("Cancel", key=f"explain.cancel.{id(task)}"):
        task.stop.set()


def explain_each(explainers, image, method, target, mask, report, stop) -> ExplainedImage:
    """One model after another, reporting progress (slow methods)."""
    results = []
    for index, explainer in enumerate(explainers):
        if stop.is_set():
            raise RuntimeError("cancelled")
        results.extend(explain_image([explainer], image, method, target, mask).results)
        report(index + 1, len(explainers))
    return ExplainedImage(image, results, mask)


def compute_row(explainers, image, mask, label: str, settings: dict, run_ids: tuple) -> ExplainedImage | None:
    method = CAM_METHODS[settings["method"]]
    if not method.slow:
        with st.spinner(f"{method.display_name} of {len(explainers)} models ..."):
            return explain_image(explainers, image, settings["method"], settings["target"], mask)
    task = background(("row", run_ids, label, settings["method"], settings["target"]), explain_each, explainers,
                      image, settings["method"], settings["target"], mask)
    if not task.finished:
        st.caption(f"{method.display_name} runs many forward passes per model; it runs in the background and the "
                   "page stays usable.")
        wait_for(task, f"{method.display_name} of {len(explainers)} models")
        return None
    if task.error:
        st.error(f"{method.display_name} failed: {task.error}")
        return None
    return task.result


def show_faithfulness(explainers, explained: ExplainedImage, names: list[str]) -> None:
    if not st.toggle("Faithfulness (ROAD)", key="explain.faithfulness",
                     help="Remove And Debias (Rong et al. 2022): how much the confidence drops when the pixels the "
                          "map calls important are removed, compared with removing the unimportant ones. Higher is "
                          "more faithful. Costs 8 forward passes per model."):
        return
    rows = [{"Model": name, "ROAD score": explainer.faithfulness(explained.image, result, size)}
            for name, (explainer, size), result in zip(names, explainers, explained.results)]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="explain.road",
                 column_config={"ROAD score": st.column_config.NumberColumn(format="%.3f")})


def show_batch_view(store: RunStore, runs: list[dict], explainers, names: list[str], method: str) -> None:
    st.subheader("Over many test images")
    data = reference_data(store, runs[0])
    if data is None or data.masks is None:
        st.caption("Needs a dataset with lesion masks (the synthetic set always has them).")
        return
    malignant = [row for row in data.indices("test") if data.table["label"].iloc[row] == 1]
    if not malignant:
        return
    count = len(malignant) if len(malignant) <= 5 else st.slider(
        "Malignant test images", min_value=5, max_value=len(malignant), value=min(50, len(malignant)),
        key="explain.batch_count")
    key = ("batch", tuple(run["run_id"] for run in runs), method, count, data.fingerprint)
    tasks = st.session_state.setdefault(TASKS, {})
    if key not in tasks:
        if st.button("Measure localisation over these images", key="explain.batch_start", icon=":material/insights:"):
            rows = malignant[:count]
            background(key, batch_measures, explainers, names, data.images[rows], data.masks[rows], method)
            st.rerun()
        st.caption("Tip for teaching: put the ink confounder on the Data page, train, and see which model looks at "
                   "the ink instead of the lesion.")
        return
    task = tasks[key]
    if not task.finished:
        wait_for(task, f"Maps of {count} images x {len(names)} models")
        return
    if task.error:
        st.error(f"The batch measures failed: {task.error}")
        return
    summary = task.result
    st.plotly_chart(localisation_bars_figure(summary["rows"], summary["lesion_area"]), width="stretch",
                    key="explain.batch_figure")
    st.dataframe(pd.DataFrame(summary["rows"]), hide_index=True, width="stretch", key="explain.batch_table")


def main() -> None:
    require_entrypoint()
    st.title("Explain")
    store = run_store()
    runs = choose_runs(store)
    if not runs:
        st.info("No trained runs yet. Train models first; the maps of all five appear here side by side.")
        st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")
        return
    source = persistent(st.radio, "Image", "explain_source", "Test image", options=["Test image", "Upload"],
                        horizontal=True)
    chosen = browse_test_images(store, runs[0]) if source == "Test image" else uploaded_image()
    if chosen is None:
        return
    image, mask, label = chosen
    settings = controls(mask is not None)
    names = [get_model_spec(run["model"]).display_name for run in runs]
    try:
        explainers = [(cached_explainer(str(store.root), run["run_id"], model_version(store, run["run_id"])),
                       int(run["config"]["image_size"])) for run in runs]
    except (ValueError, OSError) as error:
        st.error(str(error))
        return
    explained = compute_row(explainers, image, mask, label, settings, tuple(run["run_id"] for run in runs))
    if explained is None:
        return
    figure = show_row(explained, settings)
    buffer = io.BytesIO()
    Image.fromarray(figure).save(buffer, format="PNG")
    st.download_button("Download the figure (PNG)", buffer.getvalue(), file_name=f"{label}-{settings['method']}.png",
                       mime="image/png", key="explain.download", icon=":material/download:")
    show_measures(explained, names)
    show_faithfulness(explainers, explained, names)
    if source == "Test image":
        show_batch_view(store, runs, explainers, names, settings["method"] if not CAM_METHODS[settings["method"]].slow
                        else "gradcam")


main()
