"""Scores of one quiz answer and of many: a student's region against the lesion mask, each model's map against
the same mask, and the student's answer against the models'.

Marks are in image fractions, so that they do not depend on the size the image was shown at: a point is
(x, y) with x across and y down, both in [0, 1]; a box is (x0, y0, x1, y1). A mask is H x W, lesion > 0.

The student's stated probability of malignancy is their confidence in their answer: "malignant, 80%" is
0.8 and "benign, 80%" is 0.2. Its Brier score, (p - label)^2, is set against each model's on the same image:
lower is better, 0.25 is what always saying 50% earns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.audit.localisation import localisation_measures

REGION_KINDS = ("none", "points", "box")


@dataclass(frozen=True)
class Marks:
    """Where a student would look: click points, or one box, in image fractions (see the module's docstring)."""

    points: tuple[tuple[float, float], ...] = ()
    box: tuple[float, float, float, float] | None = None

    @property
    def kind(self) -> str:
        return "box" if self.box is not None else "points" if self.points else "none"

    def as_list(self) -> list:
        """The marks as plain numbers (what the store keeps): a list of [x, y], or [x0, y0, x1, y1]."""
        if self.box is not None:
            return [float(value) for value in self.box]
        return [[float(x), float(y)] for x, y in self.points]

    @staticmethod
    def from_list(kind: str, values: list) -> Marks:
        if kind == "box":
            return Marks(box=tuple(float(value) for value in values))
        if kind == "points":
            return Marks(points=tuple((float(x), float(y)) for x, y in values))
        return Marks()


def checked_marks(marks: Marks) -> Marks:
    """The marks with every coordinate a finite number in [0, 1] and the box's corners ordered; raises
    ValueError otherwise (nothing but numbers may reach the store)."""
    def fraction(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"a mark's coordinate must be a number, not {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("a mark's coordinate must be finite")
        return min(max(value, 0.0), 1.0)

    if marks.box is not None:
        if len(marks.box) != 4:
            raise ValueError("a box has four coordinates: x0, y0, x1, y1")
        x0, y0, x1, y1 = (fraction(value) for value in marks.box)
        return Marks(box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    points = []
    for point in marks.points:
        if len(point) != 2:
            raise ValueError("a point has two coordinates: x, y")
        points.append((fraction(point[0]), fraction(point[1])))
    return Marks(points=tuple(points))


def point_pixel(point: tuple[float, float], shape: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the pixel under a point given in image fractions."""
    height, width = shape
    x, y = point
    return min(int(y * height), height - 1), min(int(x * width), width - 1)


def box_pixels(box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """A boolean H x W array of the pixels a box covers: every pixel the box touches, at least one."""
    height, width = shape
    x0, y0, x1, y1 = box
    top, left = point_pixel((x0, y0), shape)
    bottom = max(top + 1, min(height, math.ceil(y1 * height)))
    right = max(left + 1, min(width, math.ceil(x1 * width)))
    covered = np.zeros(shape, dtype=bool)
    covered[top:bottom, left:right] = True
    return covered


def student_region_scores(marks: Marks, mask: np.ndarray | None) -> dict[str, float] | None:
    """The student's marks against the lesion mask, or None without a mask or marks.

    - share_inside: for points, the share of clicks inside the lesion; for a box, the share of the box on it;
    - pointing_hit: 1.0 when the student's main mark is inside the lesion (the first click, or the box's
      centre), the student's counterpart of a map's pointing game;
    - iou: for a box, its intersection over union with the lesion (NaN for points, which have no area).
    """
    if mask is None or marks.kind == "none":
        return None
    inside = np.asarray(mask) > 0
    if marks.kind == "points":
        hits = [bool(inside[point_pixel(point, inside.shape)]) for point in marks.points]
        return {"share_inside": float(np.mean(hits)), "pointing_hit": float(hits[0]), "iou": math.nan}
    covered = box_pixels(marks.box, inside.shape)
    x0, y0, x1, y1 = marks.box
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    overlap = float((covered & inside).sum())
    union = float((covered | inside).sum())
    return {"share_inside": overlap / float(covered.sum()), "pointing_hit": float(inside[point_pixel(centre,
                                                                                                     inside.shape)]),
            "iou": overlap / union if union else math.nan}


def model_map_scores(cam: np.ndarray, mask: np.ndarray | None, has_peak: bool = True) -> dict[str, float] | None:
    """A model's map against the lesion mask (`localisation_measures`): energy_inside, pointing_game, top_iou
    (its top 20% of pixels against the lesion) and lesion_area; None without a mask. A map without a peak
    (`has_peak` False: all-zero or uniform, `CamResult.all_zero` / `uniform`) points nowhere, so its
    pointing_game and top_iou are NaN, as the Explain page leaves them out."""
    if mask is None:
        return None
    measures = localisation_measures(cam, mask)
    scores = {name: measures[name] for name in ("energy_inside", "pointing_game", "top_iou", "lesion_area")}
    if not has_peak:
        scores["pointing_game"] = scores["top_iou"] = math.nan
    return scores


def stated_probability(answer: int, confidence: float) -> float:
    """The student's P(malignant): their confidence when they answered malignant, its complement otherwise."""
    if answer not in (0, 1):
        raise ValueError(f"an answer is 0 (benign) or 1 (malignant), not {answer!r}")
    if not 0.5 <= confidence <= 1:
        raise ValueError(f"a confidence is between 0.5 and 1, not {confidence!r}")
    return float(confidence) if answer == 1 else 1.0 - float(confidence)


def brier(probability: float, label: int) -> float:
    """(P(malignant) - label)^2: 0 is a confident right answer, 1 a confident wrong one."""
    return (float(probability) - float(label)) ** 2


def answer_against_models(answer: int, confidence: float, label: int,
                          models: list[tuple[str, float, float]]) -> pd.DataFrame:
    """The student's answer and each model's on one image: one row per answerer (the student first) with
    Who, Answer, P(malignant), Right and Brier. `models`: (name, P(malignant), the run's decision threshold)."""
    probability = stated_probability(answer, confidence)
    rows = [{"Who": "You", "Answer": answer, "P(malignant)": probability, "Right": answer == label,
             "Brier": brier(probability, label)}]
    for name, model_probability, threshold in models:
        called = int(model_probability >= threshold)
        rows.append({"Who": name, "Answer": called, "P(malignant)": float(model_probability), "Right": called == label,
                     "Brier": brier(model_probability, label)})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame) -> str:
    """One sentence on an `answer_against_models` table: right or wrong, and how the student's confidence
    compares with the models'."""
    student, models = table.iloc[0], table.iloc[1:]
    right = "You were right" if student["Right"] else "You were wrong"
    if models.empty:
        return f"{right}."
    models_right = int(models["Right"].sum())
    better = int((student["Brier"] < models["Brier"]).sum())
    return (f"{right}; {models_right} of {len(models)} models were right. Your Brier score {student['Brier']:.3f} "
            f"beats {better} of {len(models)} models (lower is better).")


def session_score(answers: pd.DataFrame, model_answers: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """A running score: the student's answers, how many right and their mean Brier, and a table of each model
    on the same images (Model, Answers, Right, Mean Brier).

    `answers` has the store's answer columns (answer_id, label, answer, confidence); `model_answers` has
    answer_id, model, probability and threshold, one row per model and answer."""
    if answers.empty:
        return {"answers": 0, "right": 0, "mean_brier": math.nan}, pd.DataFrame(
            columns=["Model", "Answers", "Right", "Mean Brier"])
    scored = scored_answers(answers)
    totals = {"answers": len(scored), "right": int(scored["right"].sum()), "mean_brier": float(scored["brier"].mean())}
    models = scored_model_answers(model_answers, scored)
    table = models.groupby("model", sort=False).agg(Answers=("right", "size"), Right=("right", "sum"),
                                                     **{"Mean Brier": ("brier", "mean")})
    return totals, table.reset_index().rename(columns={"model": "Model"})


def scored_answers(answers: pd.DataFrame) -> pd.DataFrame:
    """The answers with the student's probability, right and brier added."""
    scored = answers.copy()
    scored["probability"] = [stated_probability(int(a), float(c)) for a, c in zip(scored["answer"],
                                                                                   scored["confidence"])]
    scored["right"] = scored["answer"].astype(int) == scored["label"].astype(int)
    scored["brier"] = (scored["probability"] - scored["label"]) ** 2
    return scored


def scored_model_answers(model_answers: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """The models' rows of the given answers with their label, right and brier added."""
    models = model_answers.merge(answers[["answer_id", "image_id", "label"]], on="answer_id")
    models["right"] = (models["probability"] >= models["threshold"]).astype(int) == models["label"].astype(int)
    models["brier"] = (models["probability"] - models["label"]) ** 2
    return models


def class_summary(answers: pd.DataFrame, model_answers: pd.DataFrame) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The teacher's view of a class's answers: totals, a per-image table and a per-answerer table.

    - totals: answers, sessions (anonymous students), images, right, mean_brier, pointing_hit (the students'
      hit rate where there were marks and a mask);
    - per image: Image, Label, Answers, Right (share), Students' P(malignant) (mean), Students' hit rate,
      Models right (share of the model answers on it), Models' P(malignant) (mean), Models' pointing game;
    - per answerer: Who (Students, then each model), Answers, Right (share), Mean Brier, Pointing hit rate,
      over the same answered images (a model counts once per student answer, so both are weighted alike).
    """
    if answers.empty:
        empty_totals = {"answers": 0, "sessions": 0, "images": 0, "right": 0, "mean_brier": math.nan,
                        "pointing_hit": math.nan}
        return empty_totals, pd.DataFrame(), pd.DataFrame()
    scored = scored_answers(answers)
    models = scored_model_answers(model_answers, scored)
    totals = {"answers": len(scored), "sessions": int(scored["session"].nunique()),
              "images": int(scored["image_id"].nunique()), "right": int(scored["right"].sum()),
              "mean_brier": float(scored["brier"].mean()), "pointing_hit": _mean(scored["pointing_hit"])}
    per_image = scored.groupby("image_id", sort=True).agg(
        Label=("label", "first"), Answers=("answer_id", "size"), Right=("right", "mean"),
        **{"Students' P(malignant)": ("probability", "mean"), "Students' hit rate": ("pointing_hit", "mean")})
    model_image = models.groupby("image_id").agg(**{"Models right": ("right", "mean"),
                                                    "Models' P(malignant)": ("probability", "mean"),
                                                    "Models' pointing game": ("pointing_hit", "mean")})
    per_image = per_image.join(model_image).reset_index().rename(columns={"image_id": "Image"})
    per_image["Label"] = per_image["Label"].map({0: "benign", 1: "malignant"})
    rows = [{"Who": "Students", "Answers": len(scored), "Right": float(scored["right"].mean()),
             "Mean Brier": float(scored["brier"].mean()), "Pointing hit rate": _mean(scored["pointing_hit"])}]
    for name, group in models.groupby("model", sort=False):
        rows.append({"Who": name, "Answers": len(group), "Right": float(group["right"].mean()),
                     "Mean Brier": float(group["brier"].mean()), "Pointing hit rate": _mean(group["pointing_hit"])})
    return totals, per_image, pd.DataFrame(rows)


def _mean(values: pd.Series) -> float:
    """Mean of the known values (NaN where none is known: no mask, or no marks)."""
    known = pd.to_numeric(values, errors="coerce").dropna()
    return float(known.mean()) if len(known) else math.nan


def reveal_table(answer: int, confidence: float, label: int, student_region: dict | None,
                 models: list[tuple[str, float, float, dict | None]]) -> pd.DataFrame:
    """The reveal's table: `answer_against_models` with each answerer's region beside it when there is a mask:
    On the lesion (the student's share of clicks or of the box inside it; a model's CAM energy inside it),
    Pointing hit (the main mark; the map's peak) and IoU (the box; the map's top 20% of pixels), each
    against the lesion. `models`: (name, P(malignant), threshold, `model_map_scores` or None)."""
    table = answer_against_models(answer, confidence, label, [model[:3] for model in models])
    if all(scores is None for *_, scores in models) and student_region is None:
        return table
    student_region = student_region or {}
    table["On the lesion"] = [student_region.get("share_inside", math.nan)] + [
        (scores or {}).get("energy_inside", math.nan) for *_, scores in models]
    table["Pointing hit"] = [student_region.get("pointing_hit", math.nan)] + [
        (scores or {}).get("pointing_game", math.nan) for *_, scores in models]
    table["IoU"] = [student_region.get("iou", math.nan)] + [(scores or {}).get("top_iou", math.nan)
                                                            for *_, scores in models]
    return table
