"""The Quiz: scores against hand-computed values on small arrays, the anonymous SQLite store (round trip, many
writers at once, nothing that could hold a name, the class summary's counts), datasets without masks, and the
page through AppTest on two tiny runs (32 px, one epoch)."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.quiz.questions import next_image, quiz_pool
from core.quiz.scoring import (
    Marks,
    answer_against_models,
    box_pixels,
    brier,
    checked_marks,
    class_summary,
    model_map_scores,
    reveal_table,
    session_score,
    stated_probability,
    student_region_scores,
    verdict,
)
from core.quiz.store import QUIZ_FILE, ModelAnswer, QuizStore, new_session_token, quiz_store
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC


def square_mask() -> np.ndarray:
    """10 x 10, the lesion rows 2-5 and columns 2-5 (16 pixels, 16% of the image)."""
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    return mask


# Scoring

def test_points_score_their_share_inside_and_the_first_click():
    marks = Marks(points=((0.25, 0.25), (0.05, 0.05), (0.55, 0.35)))  # pixels (2, 2) in, (0, 0) out, (3, 5) in
    scores = student_region_scores(marks, square_mask())
    assert scores["share_inside"] == pytest.approx(2 / 3)
    assert scores["pointing_hit"] == 1.0 and math.isnan(scores["iou"])
    missed_first = Marks(points=((0.05, 0.05), (0.25, 0.25)))
    assert student_region_scores(missed_first, square_mask())["pointing_hit"] == 0.0
    assert student_region_scores(Marks(points=((1.0, 1.0),)), square_mask())["share_inside"] == 0.0, "edge pixel"


def test_a_box_scores_its_share_on_the_lesion_and_its_iou():
    box = Marks(box=(0.0, 0.0, 0.4, 0.4))  # rows and columns 0-3: 16 pixels, 4 of them on the lesion
    assert box_pixels(box.box, (10, 10)).sum() == 16
    scores = student_region_scores(box, square_mask())
    assert scores["share_inside"] == pytest.approx(4 / 16)
    assert scores["iou"] == pytest.approx(4 / (16 + 16 - 4))
    assert scores["pointing_hit"] == 1.0, "the centre (0.2, 0.2) is pixel (2, 2), on the lesion"
    exact = student_region_scores(Marks(box=(0.2, 0.2, 0.6, 0.6)), square_mask())
    assert exact == {"share_inside": 1.0, "pointing_hit": 1.0, "iou": 1.0}
    assert box_pixels((0.5, 0.5, 0.5, 0.5), (10, 10)).sum() == 1, "a box has at least one pixel"


def test_marks_are_checked_numbers_in_the_image():
    assert checked_marks(Marks(box=(0.6, 0.7, 0.1, 1.4))).box == (0.1, 0.7, 0.6, 1.0)
    assert checked_marks(Marks(points=((-0.1, 0.5),))).points == ((0.0, 0.5),)
    for bad in (Marks(points=(("Alice", 0.5),)), Marks(points=((math.nan, 0.5),)), Marks(box=(0.1, 0.2, 0.3)),
                Marks(points=((True, 0.5),))):
        with pytest.raises(ValueError):
            checked_marks(bad)


def test_a_models_map_scores_against_the_mask():
    cam = np.ones((10, 10))
    cam[3, 3] = 10  # the peak, on the lesion
    scores = model_map_scores(cam, square_mask())
    assert scores["energy_inside"] == pytest.approx((15 + 10) / 109)
    assert scores["pointing_game"] == 1.0 and scores["lesion_area"] == pytest.approx(0.16)
    cam[3, 3], cam[8, 8] = 1, 10
    assert model_map_scores(cam, square_mask())["pointing_game"] == 0.0
    flat = model_map_scores(np.ones((10, 10)), square_mask(), has_peak=False)
    assert flat["energy_inside"] == pytest.approx(0.16), "a flat map's energy is the lesion's area"
    assert math.isnan(flat["pointing_game"]) and math.isnan(flat["top_iou"]), "no peak to point with"


def test_the_answer_against_the_models():
    assert stated_probability(1, 0.8) == 0.8 and stated_probability(0, 0.8) == pytest.approx(0.2)
    assert brier(0.2, 0) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        stated_probability(1, 0.3)
    table = answer_against_models(0, 0.8, 0, [("A", 0.9, 0.5), ("B", 0.3, 0.5), ("C", 0.3, 0.25)])
    assert list(table["Who"]) == ["You", "A", "B", "C"]
    assert list(table["Right"]) == [True, False, True, False], "C calls malignant at its own threshold 0.25"
    assert list(table["Brier"]) == pytest.approx([0.04, 0.81, 0.09, 0.09])
    assert verdict(table) == ("You were right; 1 of 3 models were right. Your Brier score 0.040 beats 3 of 3 models "
                              "(lower is better).")


def test_a_dataset_without_masks_scores_no_region(image_folder, tmp_path):
    from core.config import DataSpec
    from core.data.datasets import prepare_data

    data = prepare_data(DataSpec(source=str(image_folder)), dataclasses.replace(TINY_CONFIG, split="70:30"),
                        tmp_path / "cache")
    assert data.masks is None
    marks = Marks(points=((0.5, 0.5),))
    assert student_region_scores(marks, data.masks) is None
    assert model_map_scores(np.ones((32, 32)), data.masks) is None
    table = reveal_table(1, 0.9, 1, None, [("A", 0.7, 0.5, None)])
    assert list(table.columns) == ["Who", "Answer", "P(malignant)", "Right", "Brier"], "no region columns"
    with_mask = reveal_table(1, 0.9, 1, None, [("A", 0.7, 0.5, {"energy_inside": 0.4, "pointing_game": 1.0,
                                                                 "top_iou": 0.3})])
    assert with_mask["On the lesion"].iloc[1] == 0.4 and math.isnan(with_mask["On the lesion"].iloc[0])


def test_questions_follow_the_teachers_set_then_stop():
    pool = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    assert next_image(pool, ["c", "x", "a"], [], rng) == "c"
    assert next_image(pool, ["c", "x", "a"], ["c"], rng) == "a", "x is not a test image of these runs"
    assert next_image(pool, ["c", "a"], ["c", "a"], rng) is None
    assert {next_image(pool, [], ["a", "b", "c"], rng) for _ in range(10)} == {"d"}, "unanswered images first"
    assert next_image(pool, [], pool, rng) in pool
    assert next_image([], [], [], rng) is None
    assert quiz_pool([["a", "b", "c"], ["c", "a"], pd.Index(["a", "c", "z"])]) == ["a", "c"]


# The store

def record(quiz: QuizStore, session: str, image_id: str, label: int, answer: int, confidence: float,
           marks: Marks = Marks(), region: dict | None = None, models=None, dataset: str = "data") -> int:
    models = models if models is not None else [ModelAnswer("run-1", "resnet18", 0.9, 0.5, 0.4, 1.0, 0.3),
                                                ModelAnswer("run-2", "densenet121", 0.2, 0.5)]
    return quiz.record_answer(session, dataset, image_id, label, answer, confidence, marks, region, models)


def test_the_store_round_trip(tmp_path):
    quiz = quiz_store(tmp_path)
    assert quiz.path == tmp_path / QUIZ_FILE
    session = new_session_token()
    marks = Marks(points=((0.25, 0.5), (0.75, 0.125)))
    first = record(quiz, session, "img-1", 1, 1, 0.9, marks, {"share_inside": 0.5, "pointing_hit": 1.0,
                                                              "iou": math.nan})
    second = record(quiz, session, "img-2", 0, 1, 0.6, Marks(box=(0.1, 0.2, 0.3, 0.4)))
    record(quiz, new_session_token(), "img-1", 1, 0, 0.5)
    record(quiz, session, "img-3", 0, 0, 0.7, dataset="another")
    answers = quiz.answers("data", session)
    assert list(answers["answer_id"]) == [first, second]
    assert answers["marks"].iloc[0] == marks and answers["marks"].iloc[1] == Marks(box=(0.1, 0.2, 0.3, 0.4))
    assert list(answers["region"]) == ["points", "box"]
    assert answers["share_inside"].iloc[0] == 0.5 and math.isnan(answers["iou"].iloc[0])
    assert math.isnan(answers["share_inside"].iloc[1])
    models = quiz.model_answers("data", session)
    assert len(models) == 4 and set(models["model"]) == {"resnet18", "densenet121"}
    assert models.loc[models["run_id"] == "run-1", "energy_inside"].iloc[0] == 0.4
    assert math.isnan(models.loc[models["run_id"] == "run-2", "energy_inside"].iloc[0])
    assert len(quiz.answers("data")) == 3 and len(quiz.model_answers("data")) == 6
    assert quiz.answered_images("data", session) == ["img-1", "img-2"]
    assert quiz_store(tmp_path).answered_images("another", session) == ["img-3"], "a second object, the same file"
    with sqlite3.connect(quiz.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_teachers_set_is_stored_for_every_session(tmp_path):
    quiz = quiz_store(tmp_path)
    assert quiz.quiz_images("data") == []
    quiz.set_quiz_images("data", ["c", "a"])
    assert quiz_store(tmp_path).quiz_images("data") == ["c", "a"] and quiz.quiz_images("other") == []
    quiz.set_quiz_images("data", ["b"])
    assert quiz.quiz_images("data") == ["b"]
    quiz.set_quiz_images("data", [])
    assert quiz.quiz_images("data") == []


def test_many_sessions_answer_at_once(tmp_path):
    quiz = quiz_store(tmp_path)
    sessions = [new_session_token() for _ in range(8)]
    errors = []
    start = threading.Barrier(len(sessions))

    def answer_many(session: str) -> None:
        try:
            start.wait()
            for index in range(20):
                record(quiz, session, f"img-{index}", index % 2, 1, 0.75, Marks(points=((0.5, 0.5),)))
        except Exception as error:  # noqa: BLE001 - collected and reported by the test
            errors.append(error)

    threads = [threading.Thread(target=answer_many, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    answers = quiz.answers("data")
    assert len(answers) == 160 and answers["answer_id"].is_unique
    assert answers.groupby("session").size().eq(20).all()
    assert len(quiz.model_answers("data")) == 320


def test_no_column_could_hold_a_name(tmp_path):
    quiz = quiz_store(tmp_path)
    with sqlite3.connect(quiz.path) as connection:
        columns = {table: [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
                   for table in ("answers", "model_answers", "quiz_sets")}
    # A new column must be added here on purpose, after asking whether it could hold a person's name.
    assert columns == {
        "answers": ["answer_id", "session", "answered_at", "dataset", "image_id", "label", "answer", "confidence",
                    "region", "marks", "share_inside", "pointing_hit", "iou"],
        "model_answers": ["answer_id", "run_id", "model", "probability", "threshold", "energy_inside",
                          "pointing_hit", "top_iou"],
        "quiz_sets": ["dataset", "image_ids", "chosen_at"],
    }
    for session in ("Alice Smith", "alice" * 6 + "ab", "A" * 32):
        with pytest.raises(ValueError):
            record(quiz, session, "img", 1, 1, 0.9)
    with pytest.raises(ValueError):
        record(quiz, new_session_token(), "img", 1, 1, 0.9, Marks(points=(("Alice", 0.5),)))
    with sqlite3.connect(quiz.path) as connection:  # the database refuses it too, whoever writes
        for session, region, marks in (("Alice Smith", "none", "[]"), ("alice" * 6 + "ab", "none", "[]"),
                                       (new_session_token(), "Alice", "[]"),
                                       (new_session_token(), "none", json.dumps({"name": "Alice"}))):
            with pytest.raises(sqlite3.IntegrityError):
                connection.execute("INSERT INTO answers (session, answered_at, dataset, image_id, label, answer, "
                                   "confidence, region, marks) VALUES (?, 0, 'd', 'i', 1, 1, 0.9, ?, ?)",
                                   (session, region, marks))
    assert quiz.answers("d").empty


def test_the_class_summary_counts(tmp_path):
    quiz = quiz_store(tmp_path)
    first, second = new_session_token(), new_session_token()
    hit, miss = {"share_inside": 1.0, "pointing_hit": 1.0}, {"share_inside": 0.0, "pointing_hit": 0.0}
    # img-1 is malignant: resnet18 says 0.9 (right, its map's peak on the lesion), densenet121 0.2 (wrong, no map).
    record(quiz, first, "img-1", 1, 1, 0.9, Marks(points=((0.5, 0.5),)), hit)
    record(quiz, second, "img-1", 1, 0, 0.6, Marks(points=((0.1, 0.1),)), miss)
    # img-2 is benign.
    record(quiz, first, "img-2", 0, 0, 1.0, Marks(), None)
    totals, per_image, answerers = class_summary(quiz.answers("data"), quiz.model_answers("data"))
    assert totals == {"answers": 3, "sessions": 2, "images": 2, "right": 2,
                      "mean_brier": pytest.approx((0.01 + 0.36 + 0.0) / 3), "pointing_hit": 0.5}
    assert list(per_image["Image"]) == ["img-1", "img-2"] and list(per_image["Label"]) == ["malignant", "benign"]
    assert list(per_image["Answers"]) == [2, 1] and list(per_image["Right"]) == [0.5, 1.0]
    assert per_image["Students' P(malignant)"].tolist() == pytest.approx([(0.9 + 0.4) / 2, 0.0])
    assert per_image["Models right"].tolist() == [0.5, 0.5], "img-2: resnet18's 0.9 is wrong, densenet121's 0.2 right"
    assert per_image["Students' hit rate"].iloc[0] == 0.5 and math.isnan(per_image["Students' hit rate"].iloc[1])
    rows = answerers.set_index("Who")
    assert list(rows.index) == ["Students", "resnet18", "densenet121"]
    assert rows.loc["Students", "Right"] == pytest.approx(2 / 3)
    assert rows.loc["resnet18", "Answers"] == 3 and rows.loc["resnet18", "Right"] == pytest.approx(2 / 3)
    assert rows.loc["densenet121", "Right"] == pytest.approx(1 / 3)
    assert rows.loc["resnet18", "Mean Brier"] == pytest.approx((0.01 + 0.01 + 0.81) / 3)
    assert rows.loc["resnet18", "Pointing hit rate"] == 1.0 and math.isnan(rows.loc["densenet121",
                                                                                   "Pointing hit rate"])
    mine, models = session_score(quiz.answers("data", first), quiz.model_answers("data", first))
    assert mine == {"answers": 2, "right": 2, "mean_brier": pytest.approx(0.005)}
    assert models.set_index("Model").loc["densenet121", "Right"] == 1
    empty, _ = session_score(quiz.answers("data", new_session_token()), quiz.model_answers("data", "x" * 32))
    assert empty["answers"] == 0
    assert class_summary(quiz.answers("nothing"), quiz.model_answers("nothing"))[0]["answers"] == 0


def test_marks_are_drawn_over_the_image():
    from core.figures import STUDENT_MARK_COLOUR, marks_overlay, quiz_answerers_figure

    image = np.zeros((100, 100, 3), dtype=np.uint8)
    drawn = marks_overlay(image, [Marks(points=((0.5, 0.5),)), Marks(box=(0.1, 0.1, 0.3, 0.3))])
    assert tuple(drawn[50, 50]) == STUDENT_MARK_COLOUR and tuple(drawn[10, 20]) == STUDENT_MARK_COLOUR
    assert tuple(drawn[80, 80]) == (0, 0, 0)
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[60:90, 60:90] = 1
    assert tuple(marks_overlay(image, [], mask)[60, 70]) == (0, 230, 118), "the lesion outline"
    figure = quiz_answerers_figure([{"Who": "Students", "Right": 0.5, "Pointing hit rate": 0.25}])
    assert [trace.name for trace in figure.data] == ["Right", "Pointing hit rate (inside the lesion)"]


# The page, through AppTest

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """ResNet18 and DenseNet121, 32 px, one epoch, on the tiny synthetic set (which has masks)."""
    from core.data.datasets import prepare_data
    from core.runs import RunStore
    from core.training.loop import run_training

    store = RunStore(tmp_path_factory.mktemp("quiz") / "runs")
    data = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, store.cache_dir)
    for model in ("resnet18", "densenet121"):
        run_training(dataclasses.replace(TINY_CONFIG, model=model), data, store)
    return store


@pytest.fixture
def runs_store(two_runs, monkeypatch):
    """The two runs as the pages' run store, with no quiz answers yet."""
    (two_runs.root / QUIZ_FILE).unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        (two_runs.root / (QUIZ_FILE + suffix)).unlink(missing_ok=True)
    monkeypatch.setenv("SKIN_RUNS_DIR", str(two_runs.root))
    return two_runs


def frame_with(app: AppTest, column: str) -> pd.DataFrame | None:
    """The first table shown with this column (AppTest does not expose a dataframe's key)."""
    return next((frame.value for frame in app.dataframe if column in frame.value.columns), None)


def open_quiz() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page("pages/quiz.py").run()
    assert not app.exception, app.exception
    return app


def answer(app: AppTest, marks: Marks, choice: str, confidence: int) -> None:
    """What the click component would have done, then the answer: the marks live in session state."""
    from pages.common import QUIZ_MARKS, QUIZ_QUESTION

    app.session_state[QUIZ_MARKS] = marks
    number = app.session_state[QUIZ_QUESTION]["number"]
    app.run()
    app.radio(key=f"quiz.answer.{number}").set_value(choice)
    app.slider(key=f"quiz.confidence.{number}").set_value(confidence).run()
    app.button(key="quiz.submit").click().run()
    assert not app.exception, app.exception


def test_the_quiz_without_runs_says_what_it_waits_for(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    app = open_quiz()
    assert "No trained runs yet" in app.info[0].value
    assert not (tmp_path / "runs" / QUIZ_FILE).exists(), "nothing stored before there is a quiz"


@pytest.mark.slow
def test_a_student_answers_sees_the_reveal_and_the_running_score(runs_store):
    from pages.common import QUIZ_QUESTION, QUIZ_TOKEN

    app = open_quiz()
    assert app.subheader[0].value == "Image 1"
    assert app.button(key="quiz.submit").disabled, "no answer picked yet"
    image_id = app.session_state[QUIZ_QUESTION]["image_id"]
    answer(app, Marks(points=((0.5, 0.5), (0.1, 0.1))), "malignant", 80)
    table = frame_with(app, "Brier")
    assert list(table["Who"]) == ["You", "ResNet18", "DenseNet121"]
    assert table["P(malignant)"].iloc[0] == pytest.approx(0.8)
    assert {"On the lesion", "Pointing hit", "IoU"} <= set(table.columns), "the synthetic set has masks"
    assert table["On the lesion"].iloc[0] in (0.0, 0.5, 1.0)
    revealed = (app.success or app.warning)[0].value
    assert revealed.startswith("**It is ") and "of 2 models were right" in revealed
    assert [metric.value for metric in app.metric][:2] == ["1", f"{int(table['Right'].iloc[0] == 'yes')} of 1"]
    quiz = quiz_store(runs_store.root)
    stored = quiz.answers(_dataset(runs_store), app.session_state[QUIZ_TOKEN])
    assert list(stored["image_id"]) == [image_id] and stored["confidence"].iloc[0] == pytest.approx(0.8)
    assert stored["marks"].iloc[0] == Marks(points=((0.5, 0.5), (0.1, 0.1)))
    assert len(app.session_state[QUIZ_TOKEN]) == 32

    app.button(key="quiz.next").click().run()
    assert not app.exception and app.subheader[0].value == "Image 2"
    assert app.session_state[QUIZ_QUESTION]["image_id"] != image_id, "an image not answered yet"
    answer(app, Marks(box=(0.2, 0.2, 0.8, 0.8)), "benign", 100)
    assert app.metric[0].value == "2"
    assert frame_with(app, "Brier")["IoU"].iloc[0] >= 0
    models = frame_with(app, "Model")
    assert list(models["Model"]) == ["ResNet18", "DenseNet121"] and list(models["Answers"]) == [2, 2]

    summary = frame_with(app, "Pointing hit rate")
    assert list(summary["Who"]) == ["Students", "ResNet18", "DenseNet121"] and list(summary["Answers"]) == [2, 2, 2]
    assert len(frame_with(app, "Image")) == 2
    assert app.selectbox(key="quiz.class_image").value in set(stored["image_id"]) | {
        app.session_state[QUIZ_QUESTION]["image_id"]}


def _dataset(store) -> str:
    runs = store.list_runs()
    return runs[0]["dataset"]["fingerprint"]


@pytest.mark.slow
def test_the_teachers_set_reaches_a_new_student_and_a_viewer_cannot_change_it(runs_store, monkeypatch):
    import pages.common
    from pages.common import QUIZ_QUESTION

    teacher = open_quiz()
    pool = teacher.multiselect(key="quiz.set_choice").options
    chosen = [option.split(" · ")[0] for option in pool[-2:]]
    teacher.multiselect(key="quiz.set_choice").set_value(chosen).run()
    teacher.button(key="quiz.set_save").click().run()
    assert not teacher.exception
    assert quiz_store(runs_store.root).quiz_images(_dataset(runs_store)) == chosen

    monkeypatch.setattr(pages.common, "can_administer", lambda: False)
    student = open_quiz()
    assert student.session_state[QUIZ_QUESTION]["image_id"] == chosen[0]
    assert any("from the teacher's set of 2" in caption.value for caption in student.caption)
    assert not student.tabs, "a viewer gets the quiz alone"
    assert not [widget for widget in student.multiselect if widget.key == "quiz.set_choice"]
    assert any("class summary and the choice of images are the teacher's" in c.value for c in student.caption)
    answer(student, Marks(), "benign", 50)
    assert frame_with(student, "Brier") is not None
    student.button(key="quiz.next").click().run()
    assert student.session_state[QUIZ_QUESTION]["image_id"] == chosen[1]
    answer(student, Marks(points=((0.5, 0.5),)), "malignant", 90)
    student.button(key="quiz.next").click().run()
    assert "answered all 2 images" in student.success[0].value


@pytest.mark.slow
def test_the_quiz_on_a_dataset_without_masks_leaves_the_region_scores_out(image_folder, tmp_path, monkeypatch):
    from core.config import DataSpec
    from core.data.datasets import prepare_data
    from core.runs import RunStore
    from core.training.loop import run_training

    store = RunStore(tmp_path / "runs")
    data = prepare_data(DataSpec(source=str(image_folder)), TINY_CONFIG, store.cache_dir)
    assert data.masks is None
    run_training(TINY_CONFIG, data, store)
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    app = open_quiz()
    answer(app, Marks(points=((0.5, 0.5),)), "benign", 60)
    table = frame_with(app, "Brier")
    assert list(table.columns) == ["Who", "Answer", "P(malignant)", "Right", "Brier"]
    assert any("no lesion masks" in caption.value for caption in app.caption)
    stored = quiz_store(store.root).answers(data.fingerprint)
    assert len(stored) == 1 and math.isnan(stored["share_inside"].iloc[0])
    assert stored["marks"].iloc[0] == Marks(points=((0.5, 0.5),)), "the marks are kept for the teacher's view"
