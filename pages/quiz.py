"""Quiz page for a class: a student marks where they would look on a test image, answers benign or malignant
with a confidence, and then sees the five models' answers and CAMs, the lesion and the scores. Answers
are stored anonymously (core.quiz.store); the teacher chooses the images and sees the class summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st
from streamlit_image_coordinates import streamlit_image_coordinates

from core.cams import (
    CAM_METHODS,
    CamExplainer,
    ExplainedImage,
    default_run_method,
    explain_inputs,
    resize_image,
    resize_mask,
)
from core.config import DataSpec
from core.data.datasets import DatasetError, PreparedData
from core.evaluation.compare import default_comparison_runs
from core.figures import explanation_panels, marks_overlay, quiz_answerers_figure
from core.models import get_model_spec
from core.quiz.questions import next_image, quiz_pool
from core.quiz.scoring import (
    Marks,
    checked_marks,
    class_summary,
    model_map_scores,
    reveal_table,
    session_score,
    student_region_scores,
    verdict,
)
from core.quiz.store import ModelAnswer, QuizStore, new_session_token, quiz_store
from core.runs import RunStore, is_ordinary_run
from core.stored_run import run_model_input
from pages.common import (
    QUIZ_MARKS,
    QUIZ_QUESTION,
    QUIZ_REVEAL,
    QUIZ_SEEN_CLICK,
    QUIZ_TOKEN,
    cached_explainer,
    can_administer,
    dataset_label,
    require_entrypoint,
    run_choice_label,
    run_data,
    run_store,
    runs_with_models,
    waiting_for_runs,
)

DISPLAY_SIZE = 320  # the image the student marks; models get their own input size
MARK_MODES = ["Click points", "Draw a box"]
ANSWERS = {"benign": 0, "malignant": 1}
CLASS_NAMES = {0: "benign", 1: "malignant"}
MIN_BOX = 0.02  # a drag shorter than this share of the image is a click, not a box


@dataclass
class QuizImage:
    """The image asked about: what the student sees and what each run's model is given."""

    image_id: str
    label: int
    display: np.ndarray  # DISPLAY_SIZE x DISPLAY_SIZE x 3 uint8
    mask: np.ndarray | None  # lesion mask at display size
    inputs: list[np.ndarray]  # per run: its own prepared pixels at its image size


@st.cache_data(max_entries=32, show_spinner="The five models' maps ...")
def model_maps(run_ids: tuple[str, ...], versions: tuple[float, ...], image_id: str, method: str,
               _explainers: list[CamExplainer],
               _inputs: list[np.ndarray], _display: np.ndarray, _mask: np.ndarray | None) -> ExplainedImage:
    """The models' maps of one image (the class each predicted), computed once for every student who gets it;
    `versions` (each model.pt's mtime) recomputes them for a resumed run."""
    return explain_inputs(_explainers, _inputs, _display, method, "predicted", _mask)


def method_name(explained: ExplainedImage) -> str:
    return CAM_METHODS[explained.results[0].method].display_name


def quiz_runs(store: RunStore) -> list[dict]:
    """The runs being compared: the newest completed training run of each model on the newest training
    run's dataset."""
    runs = runs_with_models(store)
    ordinary = [run for run in runs if run.get("status") == "completed" and is_ordinary_run(run)]
    if not ordinary:
        return []
    return default_comparison_runs(runs, (ordinary[0].get("dataset") or {}).get("fingerprint"))


def run_threshold(run: dict) -> float:
    return float((run.get("config") or {}).get("threshold", 0.5))


def model_name(run_or_model: dict | str) -> str:
    model = run_or_model["model"] if isinstance(run_or_model, dict) else run_or_model
    return get_model_spec(model).display_name


def question_image(store: RunStore, runs: list[dict], data: PreparedData, image_id: str) -> QuizImage:
    row = int(np.flatnonzero(data.table["image_id"].to_numpy() == image_id)[0])
    inputs = []
    for run in runs:
        try:
            inputs.append(run_model_input(run, data, image_id))
        except ValueError:  # another image size: the run's own load of its dataset
            inputs.append(run_model_input(run, run_data(store, run), image_id))
    mask = resize_mask(data.masks[row], DISPLAY_SIZE) if data.masks is not None else None
    return QuizImage(image_id, int(data.table["label"].iloc[row]), resize_image(data.images[row], DISPLAY_SIZE),
                     mask, inputs)


def session_token() -> str:
    """This browser session's anonymous token (no name is ever asked for or stored)."""
    if QUIZ_TOKEN not in st.session_state:
        st.session_state[QUIZ_TOKEN] = new_session_token()
    return st.session_state[QUIZ_TOKEN]


def current_question(quiz: QuizStore, dataset: str, pool: list[str]) -> dict | None:
    """The image this session is asked about: kept until the student moves on, drawn anew for another dataset
    (or a teacher's set that no longer holds it)."""
    question = st.session_state.get(QUIZ_QUESTION)
    chosen = quiz.quiz_images(dataset)
    stale = question is None or question["dataset"] != dataset or question["image_id"] not in pool or (
        chosen and question["image_id"] not in chosen)
    if stale:
        question = new_question(quiz, dataset, pool, chosen, question["number"] if question else 0)
    return question


def new_question(quiz: QuizStore, dataset: str, pool: list[str], chosen: list[str], number: int) -> dict | None:
    answered = quiz.answered_images(dataset, session_token())
    image_id = next_image(pool, chosen, answered, np.random.default_rng())
    question = None if image_id is None else {"dataset": dataset, "image_id": image_id, "number": number + 1}
    st.session_state[QUIZ_QUESTION] = question
    st.session_state[QUIZ_MARKS] = Marks()
    st.session_state.pop(QUIZ_REVEAL, None)
    return question


def take_click(value: dict | None, box: bool) -> bool:
    """Turn the component's latest event into a mark (points add up; a box replaces the last one); True when
    the marks changed. The component returns its last event on every rerun: its time tells a new one."""
    if not value or value.get("unix_time") == st.session_state.get(QUIZ_SEEN_CLICK):
        return False
    st.session_state[QUIZ_SEEN_CLICK] = value.get("unix_time")
    width, height = float(value["width"]), float(value["height"])
    marks = st.session_state.get(QUIZ_MARKS) or Marks()
    if box:
        corners = (value["x1"] / width, value["y1"] / height, value["x2"] / width, value["y2"] / height)
        if abs(corners[2] - corners[0]) < MIN_BOX or abs(corners[3] - corners[1]) < MIN_BOX:
            st.toast("Press, drag and release to draw a box.")
            return False
        # A drag may end outside the image, and up or left of where it started: clipped and ordered.
        st.session_state[QUIZ_MARKS] = checked_marks(Marks(box=corners))
    else:
        point = (value["x"] / width, value["y"] / height)
        st.session_state[QUIZ_MARKS] = checked_marks(Marks(points=(*marks.points, point)))
    return True


def describe_marks(marks: Marks) -> str:
    if marks.kind == "box":
        return "A box marked."
    if marks.kind == "points":
        return f"{len(marks.points)} point{'s' if len(marks.points) != 1 else ''} marked; the first counts most."
    return "Nothing marked yet."


def mark_region(image: QuizImage, number: int) -> None:
    """The image in the click component, with the marks so far drawn on it."""
    mode = st.radio("Mark where you would look", MARK_MODES, horizontal=True, key="quiz.mark_mode",
                    help="Click the places you would look at first (the first click is your main point), or press, "
                         "drag and release to draw one box around the area.")
    box = mode == MARK_MODES[1]
    marks = st.session_state.get(QUIZ_MARKS) or Marks()
    drawn = marks_overlay(image.display, [marks])
    value = streamlit_image_coordinates(drawn, width=DISPLAY_SIZE, key=f"quiz.marker.{number}.{int(box)}",
                                        click_and_drag=box, cursor="crosshair")
    if take_click(value, box):
        st.rerun()
    left, right = st.columns(2)
    if left.button("Undo the last mark", key="quiz.undo", disabled=marks.kind == "none", icon=":material/undo:"):
        st.session_state[QUIZ_MARKS] = Marks(points=marks.points[:-1]) if marks.kind == "points" else Marks()
        st.rerun()
    if right.button("Clear", key="quiz.clear", disabled=marks.kind == "none", icon=":material/delete_sweep:"):
        st.session_state[QUIZ_MARKS] = Marks()
        st.rerun()
    st.caption(describe_marks(marks))


def record(quiz: QuizStore, runs: list[dict], image: QuizImage, dataset: str, answer: int,
           confidence: float) -> int:
    """Score the answer against the lesion and the models, and store it; returns its id."""
    marks = st.session_state.get(QUIZ_MARKS) or Marks()
    explained = maps_of(runs, image)
    models = []
    for run, result in zip(runs, explained.results):
        scores = model_map_scores(result.cam, image.mask, has_peak(result)) or {}
        models.append(ModelAnswer(run["run_id"], run["model"], result.probability, run_threshold(run),
                                  scores.get("energy_inside", np.nan), scores.get("pointing_game", np.nan),
                                  scores.get("top_iou", np.nan)))
    return quiz.record_answer(session_token(), dataset, image.image_id, image.label, answer, confidence, marks,
                              student_region_scores(marks, image.mask), models)


def has_peak(result) -> bool:
    """An all-zero or uniform map (common at tiny image sizes) points nowhere: no pointing game for it."""
    return not (result.all_zero or result.uniform)


def maps_of(runs: list[dict], image: QuizImage) -> ExplainedImage:
    store = run_store()
    versions = tuple(store.model_path(run["run_id"]).stat().st_mtime for run in runs)
    explainers = [cached_explainer(str(store.root), run["run_id"], version) for run, version in zip(runs, versions)]
    # One method for the row, the one the Explain page starts from for these runs.
    return model_maps(tuple(run["run_id"] for run in runs), versions, image.image_id, default_run_method(runs),
                      explainers, image.inputs, image.display, image.mask)


def answer_form(quiz: QuizStore, runs: list[dict], image: QuizImage, dataset: str, number: int) -> None:
    picked = st.radio("Your answer", list(ANSWERS), index=None, key=f"quiz.answer.{number}", horizontal=True)
    confidence = st.slider("How sure are you?", min_value=50, max_value=100, value=75, step=5, format="%d%%",
                           key=f"quiz.confidence.{number}", help="50% is a guess, 100% certain.")
    marks = st.session_state.get(QUIZ_MARKS) or Marks()
    if marks.kind == "none":
        st.caption("Mark where you would look first: the reveal compares it with the lesion and the models' maps.")
    if st.button("Answer and reveal", key="quiz.submit", type="primary", disabled=picked is None,
                 icon=":material/visibility:"):
        answer_id = record(quiz, runs, image, dataset, ANSWERS[picked], confidence / 100)
        st.session_state[QUIZ_REVEAL] = {"answer_id": answer_id, "image_id": image.image_id}
        st.rerun()


def reveal(quiz: QuizStore, runs: list[dict], image: QuizImage, dataset: str) -> None:
    answer_id = st.session_state[QUIZ_REVEAL]["answer_id"]
    answers = quiz.answers(dataset, session_token())
    row = answers[answers["answer_id"] == answer_id].iloc[0]
    explained = maps_of(runs, image)
    names = [model_name(run) for run in runs]
    map_scores = [model_map_scores(result.cam, image.mask, has_peak(result)) for result in explained.results]
    region = student_region_scores(row["marks"], image.mask)
    table = reveal_table(int(row["answer"]), float(row["confidence"]), image.label, region,
                         [(name, result.probability, run_threshold(run), scores)
                          for name, result, run, scores in zip(names, explained.results, runs, map_scores)])
    text = f"**It is {CLASS_NAMES[image.label]}.** " + verdict(table)
    (st.success if table["Right"].iloc[0] else st.warning)(text)
    show_maps(explained, image, row["marks"])
    shown = table.assign(Answer=table["Answer"].map(CLASS_NAMES), Right=table["Right"].map({True: "yes", False: "no"}))
    if "Pointing hit" in shown:
        shown["Pointing hit"] = shown["Pointing hit"].map({1.0: "hit", 0.0: "miss"})
    st.dataframe(rounded(shown), hide_index=True, width="stretch", key="quiz.reveal_table", placeholder="—",
                 column_config={name: st.column_config.NumberColumn(format="%.3f")
                                for name in ("P(malignant)", "Brier", "On the lesion", "IoU")})
    if image.mask is None:
        st.caption("This dataset has no lesion masks, so where you and the models looked is not scored; the maps "
                   "still show it.")
    else:
        st.caption(f"Against the lesion (green outline, {image.mask.mean():.0%} of the image). On the lesion: your "
                   "share of clicks (or of the box) inside it; a model's share of its "
                   f"{method_name(explained)} energy inside it. "
                   "Pointing hit: your first click (or the box's centre); a map's peak. IoU: your box; a map's top "
                   "20% of pixels. —: nothing marked, or a map without a peak (all-zero or uniform, common at "
                   "small image sizes). Brier: (your P(malignant) − truth)², lower is better.")


def show_maps(explained: ExplainedImage, image: QuizImage, marks: Marks) -> None:
    """The student's marks and each model's map side by side, all with the lesion outline."""
    panels = explanation_panels(explained, show_mask=image.mask is not None)
    show_tiles([("You", describe_marks(marks), marks_overlay(image.display, [marks], image.mask))]
               + [(title, subtitle.replace("->", "→"), images[0]) for title, subtitle, images in panels])
    st.caption(f"{method_name(explained)} of the class each model predicted (red: most important)"
               + (", lesion outline in green" if image.mask is not None else "") + "; your marks in cyan.")


def show_tiles(tiles: list[tuple[str, str, np.ndarray]]) -> None:
    """Tiles side by side: one row of columns per kind of content, so that titles, captions and images each
    start at one height whatever the captions' lengths (as on the Explain page)."""
    for column, (title, _, _) in zip(st.columns(len(tiles)), tiles):
        column.markdown(f"**{title}**")
    for column, (_, caption, _) in zip(st.columns(len(tiles)), tiles):
        column.caption(caption)
    for column, (_, _, picture) in zip(st.columns(len(tiles)), tiles):
        column.image(picture, width="stretch")


def rounded(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Numbers rounded here, so that a table shows what the sentences and metrics above it say (the browser's
    formatting rounds halves the other way)."""
    return table.round({column: digits for column in table.select_dtypes("number").columns})


def running_score(quiz: QuizStore, dataset: str) -> None:
    st.subheader("Your score")
    answers = quiz.answers(dataset, session_token())
    totals, models = session_score(answers, quiz.model_answers(dataset, session_token()))
    if not totals["answers"]:
        st.caption("Nothing answered yet in this session.")
        return
    columns = st.columns(3)
    columns[0].metric("Answers", totals["answers"])
    columns[1].metric("Right", f"{totals['right']} of {totals['answers']}")
    columns[2].metric("Mean Brier", f"{totals['mean_brier']:.3f}", help="Lower is better; always saying 50% scores "
                                                                         "0.25.")
    models["Model"] = models["Model"].map(model_name)
    st.caption("The models on the same images:")
    st.dataframe(rounded(models), hide_index=True, width="stretch", key="quiz.session_models",
                 column_config={"Mean Brier": st.column_config.NumberColumn(format="%.3f")})


def ask(quiz: QuizStore, store: RunStore, runs: list[dict], data: PreparedData, dataset: str,
        pool: list[str]) -> None:
    question = current_question(quiz, dataset, pool)
    chosen = quiz.quiz_images(dataset)
    if question is None:
        st.success(f"You have answered all {len(chosen)} images the teacher chose. Well done!")
        running_score(quiz, dataset)
        return
    image = question_image(store, runs, data, question["image_id"])
    where = f"from the teacher's set of {len(chosen)}" if chosen else f"drawn at random from {len(pool)} test images"
    st.subheader(f"Image {question['number']}")
    st.caption(f"Image {image.image_id}, {where}.")
    revealed = (st.session_state.get(QUIZ_REVEAL) or {}).get("image_id") == image.image_id
    if revealed:
        reveal(quiz, runs, image, dataset)
        if st.button("Next image", key="quiz.next", type="primary", icon=":material/arrow_forward:"):
            new_question(quiz, dataset, pool, chosen, question["number"])
            st.rerun()
    else:
        left, right = st.columns([1.2, 1])
        with left:
            mark_region(image, question["number"])
        with right:
            answer_form(quiz, runs, image, dataset, question["number"])
    running_score(quiz, dataset)


def class_view(quiz: QuizStore, store: RunStore, runs: list[dict], data: PreparedData, dataset: str) -> None:
    """The teacher's summary: answers and right per image and overall, against the models on the same images,
    and where the students looked next to the models' maps."""
    answers, model_answers = quiz.answers(dataset), quiz.model_answers(dataset)
    model_answers["model"] = model_answers["model"].map(model_name)
    totals, per_image, answerers = class_summary(answers, model_answers)
    if not totals["answers"]:
        st.info("No answers on this dataset yet. They appear here as the class answers (refresh the page).")
        return
    columns = st.columns(4)
    columns[0].metric("Answers", totals["answers"], help=f"From {totals['sessions']} anonymous browser sessions.")
    columns[1].metric("Right", f"{totals['right']} of {totals['answers']}")
    columns[2].metric("Mean Brier", f"{totals['mean_brier']:.3f}")
    columns[3].metric("Images", totals["images"])
    st.plotly_chart(quiz_answerers_figure(answerers.to_dict("records")), width="stretch", key="quiz.class_figure")
    two_places = {name: st.column_config.NumberColumn(format="%.2f") for name in
               ("Right", "Mean Brier", "Pointing hit rate", "Students' P(malignant)", "Students' hit rate",
                "Models right", "Models' P(malignant)", "Models' pointing game")}
    st.dataframe(rounded(answerers, 2), hide_index=True, width="stretch", key="quiz.class_answerers",
                 column_config=two_places, placeholder="—")
    st.caption("Each model is counted once per student answer, on the image that student answered, so the rows "
               "weigh the images alike. Pointing hit: a student's first click or box centre, a model's map peak, "
               "inside the lesion (empty without lesion masks).")
    st.markdown("**Per image**")
    st.dataframe(rounded(per_image, 2), hide_index=True, width="stretch", key="quiz.class_images",
                 column_config=two_places, placeholder="—")
    where_students_looked(answers, per_image, store, runs, data)


def answer_count(answers: pd.DataFrame, image_id: str) -> str:
    count = int((answers["image_id"] == image_id).sum())
    return f"{count} answer{'s' if count != 1 else ''}"


def where_students_looked(answers: pd.DataFrame, per_image: pd.DataFrame, store: RunStore, runs: list[dict],
                          data: PreparedData) -> None:
    st.markdown("**Where the students looked**")
    image_id = st.selectbox("Image", list(per_image["Image"]), key="quiz.class_image",
                            format_func=lambda i: f"{i} · {answer_count(answers, i)}")
    image = question_image(store, runs, data, image_id)
    marks = list(answers.loc[answers["image_id"] == image_id, "marks"])
    explained = maps_of(runs, image)
    panels = explanation_panels(explained, show_mask=image.mask is not None)
    marked = sum(mark.kind != "none" for mark in marks)
    show_tiles([("Students", f"{marked} of {len(marks)} answer{'s' if len(marks) != 1 else ''} marked",
                 marks_overlay(image.display, marks, image.mask, opacity=0.6))]
               + [(title, subtitle.replace("->", "→"), images[0]) for title, subtitle, images in panels])
    st.caption("All students' marks in cyan (crowded places are brighter) beside each model's "
               f"{method_name(explained)} of the class it predicted"
               + (", the lesion outlined in green." if image.mask is not None else "."))


def choose_images(quiz: QuizStore, data: PreparedData, dataset: str, pool: list[str]) -> None:
    """The teacher's set: every student's session gets these images, in this order."""
    current = [image_id for image_id in quiz.quiz_images(dataset) if image_id in pool]
    labels = dict(zip(data.table["image_id"], data.table["label"]))
    st.caption("Without a set, each student gets random test images. With one, every student gets these images in "
               "this order, and is done after the last.")
    picked = st.multiselect("Images for the class", pool, default=current, key="quiz.set_choice",
                            format_func=lambda i: f"{i} · {CLASS_NAMES[int(labels[i])]}")
    left, right = st.columns(2)
    if left.button("Use these images", key="quiz.set_save", disabled=not picked, icon=":material/save:"):
        if can_administer():  # checked again on the server: a forged rerun of a viewer changes nothing
            quiz.set_quiz_images(dataset, picked)
            st.toast(f"The class now gets these {len(picked)} images.")
    if right.button("Back to random images", key="quiz.set_clear", disabled=not current, icon=":material/shuffle:"):
        if can_administer():
            quiz.set_quiz_images(dataset, [])
            st.toast("The class now gets random test images.")


def main() -> None:
    require_entrypoint()
    st.title("Quiz")
    st.caption("Where would you look, and is it benign or malignant? Mark the image, answer, then see what the "
               "models said and where they looked. Answers are stored anonymously: a random token for this browser "
               "session, never a name.")
    store = run_store()
    runs = quiz_runs(store)
    if not runs:
        waiting_for_runs()
        return
    try:
        data = run_data(store, runs[0])
    except (DatasetError, ValueError, OSError, TypeError) as error:
        st.error(f"Cannot load the dataset of {run_choice_label(runs[0])}: {error}")
        return
    dataset = data.fingerprint
    tests = [store.predictions(run["run_id"]).query("split == 'test'")["image_id"].astype(str) for run in runs]
    pool = quiz_pool([[i for i in tests[0] if i in set(data.table["image_id"])], *tests[1:]])
    spec = (runs[0].get("dataset") or {}).get("spec")
    shown = dataset_label(DataSpec.from_dict(spec)) if spec else "the runs’ dataset"
    st.caption(f"Test images of {shown}; the models: "
               + ", ".join(model_name(run) for run in runs) + " (the newest completed training run of each).")
    if not pool:
        st.warning("The runs share no test images that their dataset still holds; train them on one dataset.")
        return
    quiz = quiz_store(store.root)  # per page run, not cached: a deleted file is created again
    if not can_administer():
        ask(quiz, store, runs, data, dataset, pool)
        st.caption("The class summary and the choice of images are the teacher's; you see your own score.")
        return
    quiz_tab, class_tab, set_tab = st.tabs(["Quiz", "Class summary (teacher)", "Choose the images (teacher)"])
    with quiz_tab:
        ask(quiz, store, runs, data, dataset, pool)
    with class_tab:
        class_view(quiz, store, runs, data, dataset)
    with set_tab:
        choose_images(quiz, data, dataset, pool)


main()
