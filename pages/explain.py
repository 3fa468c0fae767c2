"""Explain page: where each of the five models looks, side by side, and whether that is the lesion."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core.audit.store import AUDIT_FOLDER, sanity_verdict
from core.audit.summary import sanity_flag
from core.cams import (
    CAM_METHODS,
    COLOUR_MAPS,
    CamExplainer,
    ExplainedImage,
    agreement_matrices,
    batch_measures,
    colour_map_colours,
    decoded_inputs,
    default_run_method,
    energy_inside,
    explain_inputs,
    pointing_game_hit,
    resize_image,
    resize_mask,
    shared_scale_maximum,
)
from core.config import DataSpec
from core.data.datasets import DatasetError, PreparedData
from core.data.images import ImageError, decode_image
from core.evaluation.compare import default_comparison_runs
from core.evaluation.ood import describe_score
from core.evaluation.predict import score_images
from core.figures import (
    colour_bar_figure,
    explanation_panels,
    labelled_grid,
    localisation_bars_figure,
    pairwise_matrix_figure,
)
from core.models import get_model_spec, small_input_note
from core.runs import RunStore, is_ordinary_run
from core.stored_run import run_image_size, run_model_input
from core.training.jobs import BackgroundTask
from pages.common import (
    DATA_SPEC,
    EXPLAIN_REQUEST,
    FROM_COMPARE,
    VALUE_PREFIX,
    cached_explainer,
    cached_ood_detector,
    can_administer,
    current_data_spec,
    dataset_label,
    fragment_running_alone,
    model_version,
    persistent,
    require_entrypoint,
    run_choice_label,
    run_data,
    run_store,
    waiting_for_runs,
)

DISPLAY_SIZE = 224  # the overlays' size; models get their own input size
MAX_UPLOAD_PIXELS = 40_000_000  # larger uploads are refused before decoding
BROWSE = ["All test images", "True benign", "True malignant", "Predicted benign", "Predicted malignant",
          "Right", "Wrong", "Most confident mistakes"]
FROM_COMPARE_OPTION = "From Compare"
TARGETS = {"Predicted class": "predicted", "Malignant": 1, "Benign": 0}
# Session-state keys of this page.
TASKS = "explain.tasks"  # background tasks of this session: slow CAM rows and batch measures, by key
RUNS_KEY, BROWSE_KEY, IMAGE_KEY = "explain.runs", "explain.browse", "explain.image_id"


@dataclass
class ChosenImage:
    """The image to explain: what is shown, and what each run's model is given."""

    label: str  # the image id, or the upload's file name
    display: np.ndarray  # DISPLAY_SIZE x DISPLAY_SIZE x 3 uint8, only shown
    mask: np.ndarray | None  # lesion mask at display size
    inputs: list[np.ndarray]  # per run: uint8 at the run's image size
    notes: list[str]  # per run: why its input is not its own stored test image ('' when it is)


def take_compare_request() -> bool:
    """Consume a request from Compare's per-image explorer, once: its runs and images become this page's
    choice, and stay in this session (FROM_COMPARE) until another request replaces them."""
    request = st.session_state.pop(EXPLAIN_REQUEST, None)
    if not request:
        return False
    st.session_state[FROM_COMPARE] = {"run_ids": [str(i) for i in request.get("run_ids") or []],
                                      "image_ids": [str(i) for i in request.get("image_ids") or []]}
    st.session_state[BROWSE_KEY] = FROM_COMPARE_OPTION
    st.session_state.pop(IMAGE_KEY, None)
    st.session_state[VALUE_PREFIX + "explain_source"] = "Test image"
    return True


def default_dataset_run(runs: list[dict]) -> dict | None:
    """A run on the dataset whose runs are the default: the Data page's dataset when runs were trained
    on it, else the newest training run's."""
    ordinary = [run for run in runs if run.get("status") == "completed" and is_ordinary_run(run)]
    if DATA_SPEC in st.session_state:
        chosen = current_data_spec().to_dict()
        on_chosen = [run for run in ordinary if (run.get("dataset") or {}).get("spec") == chosen]
        if on_chosen:
            return on_chosen[0]
    return ordinary[0] if ordinary else None


def dataset_name(run: dict) -> str:
    dataset = run.get("dataset") or {}
    if dataset.get("spec"):
        return dataset_label(DataSpec.from_dict(dataset["spec"]))
    return dataset.get("name", "its dataset")


def choose_runs(store: RunStore, fresh_request: bool) -> list[dict]:
    runs = [run for run in store.list_runs() if run.get("status") in ("completed", "stopped")
            and store.model_path(run["run_id"]).exists()]
    by_id = {run["run_id"]: run for run in runs}
    on_dataset = default_dataset_run(runs)
    fingerprint = (on_dataset.get("dataset") or {}).get("fingerprint") if on_dataset else None
    default = [run["run_id"] for run in default_comparison_runs(runs, fingerprint)]
    request = st.session_state.get(FROM_COMPARE)
    requested = [run_id for run_id in request["run_ids"] if run_id in by_id] if request else []
    if fresh_request and requested:
        st.session_state[RUNS_KEY] = requested
    # A value set through session state must not also get a default (Streamlit warns on the page).
    initial = {} if RUNS_KEY in st.session_state else {"default": requested or default}
    chosen = st.multiselect("Runs", list(by_id), key=RUNS_KEY,
                            format_func=lambda run_id: run_choice_label(by_id[run_id]),
                            help="The first run is the reference: its test images are listed below.", **initial)
    if chosen:
        st.caption(which_runs_line([by_id[run_id] for run_id in chosen], chosen == default, chosen == requested,
                                   on_dataset))
    return [by_id[run_id] for run_id in chosen]


def which_runs_line(runs: list[dict], is_default: bool, is_requested: bool, on_dataset: dict | None) -> str:
    """One line saying which runs are shown and why."""
    if is_requested:
        why = "The runs sent from Compare's per-image explorer"
    elif is_default and on_dataset is not None:
        why = (f"The newest completed training run of each model on {dataset_name(on_dataset)}; tuning trials and "
               "ablation cells only when chosen")
    else:
        why = "The runs chosen above"
    return f"{why}. Test images come from the first, {run_choice_label(runs[0])}."


def reference_data(store: RunStore, reference: dict) -> PreparedData | None:
    try:
        return run_data(store, reference)
    except (DatasetError, ValueError, OSError) as error:
        st.error(f"Cannot load the dataset of run {reference['run_id']}: {error}")
        return None


def browse_test_images(store: RunStore, runs: list[dict]) -> ChosenImage | None:
    """A test image of the reference run's dataset, browsable by class, prediction and mistakes, or among
    the images sent from Compare."""
    reference = runs[0]
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
    filters = browse_filters(test)
    request = st.session_state.get(FROM_COMPARE)
    options = list(BROWSE)
    if request:
        filters[FROM_COMPARE_OPTION] = [i for i in request["image_ids"] if i in test.index]
        options.append(FROM_COMPARE_OPTION)
    left, right = st.columns([1, 2])
    initial = {} if BROWSE_KEY in st.session_state else {"index": len(options) - 1 if request else 0}
    browse = left.selectbox("Show", options, key=BROWSE_KEY, **initial,
                            format_func=lambda option: f"{option} ({len(filters[option])} images)"
                            if option == FROM_COMPARE_OPTION else option)
    candidates = list(filters[browse])
    if browse == FROM_COMPARE_OPTION and len(candidates) < len(request["image_ids"]):
        st.caption(f"{len(request['image_ids']) - len(candidates)} of the images sent from Compare are not test "
                   "images of the reference run.")
    if not candidates:
        right.info(f"No test images in '{browse}' for {get_model_spec(reference['model']).display_name}.")
        return None
    name = get_model_spec(reference["model"]).display_name
    image_id = right.selectbox(f"Image ({len(candidates)})", candidates, key=IMAGE_KEY,
                               format_func=lambda i: f"{i} · {'malignant' if test.loc[i, 'label'] else 'benign'} · "
                                                     f"P(malignant) {test.loc[i, 'prob_malignant']:.3f} by {name} "
                                                     "(stored)")
    return dataset_image(store, runs, data, image_id)


def browse_filters(test: pd.DataFrame) -> dict[str, pd.Index]:
    called = (test["prob_malignant"] >= 0.5).astype(int)
    confidence_of_mistake = np.where(called != test["label"], (test["prob_malignant"] - 0.5).abs(), -1)
    mistakes = int((confidence_of_mistake >= 0).sum())
    return {
        "All test images": test.index, "True benign": test.index[test["label"] == 0],
        "True malignant": test.index[test["label"] == 1], "Predicted benign": test.index[called == 0],
        "Predicted malignant": test.index[called == 1], "Right": test.index[called == test["label"]],
        "Wrong": test.index[called != test["label"]],
        "Most confident mistakes": test.index[np.argsort(-confidence_of_mistake)][:mistakes],
    }


def dataset_image(store: RunStore, runs: list[dict], data: PreparedData, image_id: str) -> ChosenImage:
    """Each run gets its own prepared pixels of the image at its own size, the input its stored
    prediction came from; the reference's image is upscaled for display only."""
    row = int(np.flatnonzero(data.table["image_id"].to_numpy() == image_id)[0])
    reference_input = data.images[row]
    inputs, notes = [], []
    for run in runs:
        try:
            inputs.append(own_input(store, run, data, image_id))
            notes.append("")
        except (DatasetError, ValueError, OSError) as error:
            size = run_image_size(run)
            inputs.append(resize_image(reference_input, size))
            notes.append(f"Not this run's own image ({error}): the reference run's image resized to {size} px, so "
                         "its P(malignant) is no stored prediction.")
    mask = resize_mask(data.masks[row], DISPLAY_SIZE) if data.masks is not None else None
    return ChosenImage(image_id, resize_image(reference_input, DISPLAY_SIZE), mask, inputs, notes)


def own_input(store: RunStore, run: dict, reference: PreparedData, image_id: str) -> np.ndarray:
    try:
        return run_model_input(run, reference, image_id)
    except ValueError:
        return run_model_input(run, run_data(store, run), image_id)  # another size or dataset: its own load


def uploaded_image(runs: list[dict]) -> ChosenImage | None:
    upload = st.file_uploader("A dermoscopic image (JPEG or PNG)", type=["jpg", "jpeg", "png"], key="explain.upload")
    if upload is None:
        return None
    content = upload.getvalue()
    try:
        with Image.open(io.BytesIO(content)) as probe:
            if probe.width * probe.height > MAX_UPLOAD_PIXELS:
                raise ImageError(f"image too large ({probe.width} x {probe.height} pixels)")
        display = decode_image(io.BytesIO(content), DISPLAY_SIZE)
        inputs = decoded_inputs(content, [run_image_size(run) for run in runs])
    except ImageError as error:
        st.error(f"Cannot use {upload.name}: {error}.")
        return None
    except Exception as error:  # noqa: BLE001 - whatever PIL raises on hostile bytes, the page goes on
        st.error(f"Cannot use {upload.name}: not a readable image ({type(error).__name__}).")
        return None
    return ChosenImage(upload.name, display, None, inputs, [""] * len(runs))


def controls(has_mask: bool, default_method: str) -> dict:
    columns = st.columns([1.3, 1.2, 1.1, 1, 1.2])
    with columns[0]:
        method = persistent(st.selectbox, "CAM method", "cam_method", default_method, options=list(CAM_METHODS),
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
        shared = persistent(st.toggle, "Shared scale", "cam_shared_scale", False,
                            help="Scale the five maps together (by the largest) instead of each to its own maximum.")
        # Without a mask the toggle is left out: a disabled toggle would still look switched on.
        show_mask = has_mask and persistent(st.toggle, "Lesion outline", "cam_show_mask", True,
                                            help="The lesion mask's border in green.")
    return {"method": method, "target": TARGETS[target], "opacity": opacity, "colour_map": colour_map,
            "shared": shared, "show_mask": show_mask}


@st.cache_data(max_entries=64, show_spinner=False)
def cached_verdict(run_folder: str, method: str, audit_version: float) -> dict | None:
    """The run's newest randomisation result for the method; `audit_version` (its audit folder's mtime, which
    a newly stored result changes) keeps the cache fresh."""
    return sanity_verdict(Path(run_folder), method)


def sanity_verdicts(store: RunStore, runs: list[dict], method: str) -> list[dict | None]:
    """Per run: its stored randomisation sanity check of the method, None when not audited."""
    verdicts = []
    for run in runs:
        folder = store.root / run["run_id"]
        audit_folder = folder / AUDIT_FOLDER
        version = audit_folder.stat().st_mtime if audit_folder.is_dir() else 0.0
        verdicts.append(cached_verdict(str(folder), method, version) if version else None)
    return verdicts


def show_row(explained: ExplainedImage, settings: dict, notes: list[str],
             verdicts: list[dict | None] | None = None,
             out_of_distribution: list[tuple[bool, str]] | None = None) -> np.ndarray:
    panels = explanation_panels(explained, settings["opacity"], settings["colour_map"], settings["shared"],
                                settings["show_mask"])
    count = len(panels)
    # One row of columns per kind of content: a row is as tall as its tallest cell, so titles, heatmaps and
    # contours each start at one height whatever the lengths of the names and captions above them.
    unlike = out_of_distribution or [(False, "")] * count
    for column, (title, subtitle, _), (flagged, ood_text) in zip(st.columns(count), panels, unlike):
        column.markdown(f"**{title}**")
        column.caption(subtitle.replace("->", "→"))
        # Beside P(malignant), which it qualifies, not below the maps where it is read too late.
        if flagged:
            column.warning(ood_text, icon="⚠️")
        elif ood_text:
            column.caption(ood_text)
    for column, (_, _, images) in zip(st.columns(count), panels):
        column.image(images[0], width="stretch")
    show_colour_bar(explained, settings)
    for column, (_, _, images) in zip(st.columns(count), panels):
        column.image(images[1], width="stretch")
    st.caption("Above: contours at 25/50/75% of each map" + (", lesion outline in green" if settings["show_mask"]
                                                             else "") + ".")
    for size in sorted({image.shape[0] for image in explained.inputs or []}):
        if note := small_input_note(size):
            st.caption(note)
    verdicts = verdicts or [None] * count
    method_name = CAM_METHODS[settings["method"]].display_name
    for column, result, note, verdict in zip(st.columns(count), explained.results, notes, verdicts):
        if verdict is not None:
            fails, text = sanity_flag(method_name, verdict)
            if fails:
                column.warning(text, icon="⚠️")
            else:
                column.caption(text)
        if result.all_zero:
            column.info("All-zero map: nothing in this image raises the score of the explained class "
                        "(common when explaining 'benign').")
        elif result.uniform:
            column.info("Uniform map: no location information (the model's last feature map is too small at "
                        "its training size).")
        if note:
            column.warning(note)
    unaudited = [title for (title, _, _), verdict in zip(panels, verdicts) if verdict is None]
    if unaudited:
        st.caption(f"{method_name} of {', '.join(unaudited)} not audited yet: the Audit page's randomisation sanity "
                   "check tells whether these maps depend on what the model learnt.")
    return labelled_grid([(title + (" · OOD" if flagged else ""), subtitle, images)
                          for (title, subtitle, images), (flagged, _) in zip(panels, unlike)])


def upload_ood(store: RunStore, runs: list[dict], explainers: list[CamExplainer],
               chosen: ChosenImage) -> list[tuple[bool, str]]:
    """Per run: whether the upload is beyond its out-of-distribution threshold, and the line saying so. An
    upload is outside every run's own data, so its P(malignant) needs this caution."""
    lines = []
    for run, explainer, image in zip(runs, explainers, chosen.inputs):
        detector, reason = cached_ood_detector(str(store.root), run["run_id"], model_version(store, run["run_id"]))
        if detector is None:
            lines.append((False, f"No OOD score: {reason}."))
            continue
        scored = explainer.with_model(lambda model, run=run, image=image, detector=detector: score_images(
            run, store, image[None], model, detector))
        lines.append(describe_score(float(scored.ood_scores[0]), detector.threshold))
    return lines


def show_colour_bar(explained: ExplainedImage, settings: dict) -> None:
    left, right = st.columns([3, 2], vertical_alignment="center")
    colours = colour_map_colours(settings["colour_map"])
    if settings["shared"]:
        figure = colour_bar_figure(colours, shared_scale_maximum(explained.results),
                                   "Colour scale, shared by all maps (the maps' own units)")
        text = "The same colour is the same value in every model's map."
    else:
        figure = colour_bar_figure(colours, None, "Colour scale, each map to its own maximum")
        text = "Colours compare places within one map, not between models: turn on 'Shared scale' for that."
    left.plotly_chart(figure, width="stretch", key="explain.colour_bar", config={"displayModeBar": False})
    right.caption(text)


def show_measures(explained: ExplainedImage, names: list[str]) -> None:
    correlation, iou = agreement_matrices(explained.results)
    left, right = st.columns(2)
    left.plotly_chart(pairwise_matrix_figure(names, correlation, "Agreement: rank correlation of the maps", -1, 1),
                      width="stretch", key="explain.correlation")
    right.plotly_chart(pairwise_matrix_figure(names, iou, "Agreement: IoU of the top 20% of each map"),
                       width="stretch", key="explain.iou")
    if explained.mask is not None:
        rows = [{"Model": name, "CAM energy inside the lesion": energy_inside(r.cam, explained.mask),
                 "Pointing game (peak inside the lesion)": pointing_game_cell(r, explained.mask)}
                for name, r in zip(names, explained.results)]
        st.subheader("Localisation")
        st.caption(f"The lesion covers {explained.mask.mean():.0%} of the image: a map that ignores the lesion puts "
                   "about that share of its energy inside it.")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="explain.localisation",
                     column_config={"CAM energy inside the lesion": st.column_config.NumberColumn(format="%.2f")})


def pointing_game_cell(result, mask: np.ndarray) -> str:
    if result.all_zero or result.uniform:  # no peak to point with
        return "all-zero map" if result.all_zero else "uniform map"
    return "hit" if pointing_game_hit(result.cam, mask) else "miss"


def background(key: tuple, function, *args) -> BackgroundTask:
    """This session's task for `key`, started on first request."""
    tasks = st.session_state.setdefault(TASKS, {})
    if key not in tasks:
        tasks[key] = BackgroundTask(function, *args)
    return tasks[key]


@st.fragment(run_every=1.0)
def wait_for(task: BackgroundTask, label: str) -> None:
    """A progress bar redrawn every second; the page reruns when the task ends."""
    if task.finished and fragment_running_alone():  # within a full run, a rerun would lose its click
        st.rerun(scope="app")
    st.progress(task.fraction, text=f"{label}: {task.fraction:.0%}")
    if st.button("Cancel", key=f"explain.cancel.{id(task)}"):
        task.stop.set()


def compute_row(explainers: list[CamExplainer], chosen: ChosenImage, settings: dict,
                run_ids: tuple) -> ExplainedImage | None:
    method = CAM_METHODS[settings["method"]]
    arguments = (explainers, chosen.inputs, chosen.display, settings["method"], settings["target"], chosen.mask)
    if not method.slow:
        with st.spinner(f"{method.display_name} of {len(explainers)} models ..."):
            return explain_inputs(*arguments)
    # The pixels are part of the key: two uploads may share a file name.
    pixels = hashlib.sha1(b"".join(image.tobytes() for image in chosen.inputs)).hexdigest()[:12]
    key = ("row", run_ids, chosen.label, pixels, settings["method"], settings["target"])
    task = background(key, explain_inputs, *arguments)
    if not task.finished:
        st.caption(f"{method.display_name} runs many forward passes per model; it runs in the background and the "
                   "page stays usable.")
        wait_for(task, f"{method.display_name} of {len(explainers)} models")
        return None
    if task.error and task.error.startswith("CamCancelled"):
        st.info(f"{method.display_name} was cancelled.")
        if st.button("Start it again", key="explain.restart"):
            del st.session_state[TASKS][key]
            st.rerun()
        return None
    if task.error:
        st.error(f"{method.display_name} failed: {task.error}")
        return None
    return task.result


def show_faithfulness(explainers: list[CamExplainer], explained: ExplainedImage, names: list[str]) -> None:
    if not st.toggle("Faithfulness (ROAD)", key="explain.faithfulness",
                     help="Remove And Debias (Rong et al. 2022): how much the confidence drops when the pixels the "
                          "map calls important are removed, compared with removing the unimportant ones. Higher is "
                          "more faithful. Costs 8 forward passes per model."):
        return
    rows = [{"Model": name, "ROAD score": explainer.faithfulness(image, result, image.shape[0])}
            for name, explainer, image, result in zip(names, explainers, explained.inputs, explained.results)]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="explain.road",
                 column_config={"ROAD score": st.column_config.NumberColumn(format="%.3f")})


def show_batch_view(data: PreparedData, runs: list[dict], explainers: list[CamExplainer], names: list[str],
                    method: str) -> None:
    st.subheader("Over many test images")
    if data.masks is None:
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
            sized = [(explainer, run_image_size(run)) for explainer, run in zip(explainers, runs)]
            background(key, batch_measures, sized, names, data.images[rows], data.masks[rows], method)
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
    st.caption("Pointing-game hits over the maps with a peak (an all-zero map has none): " + "; ".join(
        f"{row['Model']}: {row['Pointing game']}" for row in summary["rows"]) + ".")
    st.dataframe(pd.DataFrame(summary["rows"]), hide_index=True, width="stretch", key="explain.batch_table",
                 placeholder="—")


def main() -> None:
    require_entrypoint()
    st.title("Explain")
    fresh_request = take_compare_request()
    store = run_store()
    runs = choose_runs(store, fresh_request)
    if not runs:
        waiting_for_runs()
        return
    # Viewers explain the runs' test images only: a classroom server is no place for photos of students' own
    # skin (the models are no diagnostic tool), and the quiz needs no upload.
    source = persistent(st.radio, "Image", "explain_source", "Test image", options=["Test image", "Upload"],
                        horizontal=True) if can_administer() else "Test image"
    chosen = browse_test_images(store, runs) if source == "Test image" else uploaded_image(runs)
    if chosen is None:
        return
    default_method = default_run_method(runs)  # HiResCAM below 128 px, else the paper's Grad-CAM
    settings = controls(chosen.mask is not None, default_method)
    names = [get_model_spec(run["model"]).display_name for run in runs]
    try:
        explainers = [cached_explainer(str(store.root), run["run_id"], model_version(store, run["run_id"]))
                      for run in runs]
    except (ValueError, OSError) as error:
        st.error(str(error))
        return
    explained = compute_row(explainers, chosen, settings, tuple(run["run_id"] for run in runs))
    if explained is None:
        return
    unlike = upload_ood(store, runs, explainers, chosen) if source == "Upload" else None
    figure = show_row(explained, settings, chosen.notes, sanity_verdicts(store, runs, settings["method"]), unlike)
    buffer = io.BytesIO()
    Image.fromarray(figure).save(buffer, format="PNG")
    st.download_button("Download the figure (PNG)", buffer.getvalue(),
                       file_name=f"{chosen.label}-{settings['method']}.png", mime="image/png",
                       key="explain.download", icon=":material/download:", on_click="ignore")
    show_measures(explained, names)
    show_faithfulness(explainers, explained, names)
    if source == "Test image":
        data = reference_data(store, runs[0])  # cached: the same load the image list used
        if data is not None:
            show_batch_view(data, runs, explainers, names, settings["method"]
                            if not CAM_METHODS[settings["method"]].slow else default_method)


main()
