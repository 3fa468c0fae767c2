"""ISIC-compatible scores checked against the ISIC challenges' own scorers: the PyPI package
isic-challenge-scoring (ISIC 2017-2019: auc_sens_80, AUC, average precision, sensitivity, specificity,
accuracy) and the ISIC 2024 Kaggle metric (pAUC above 80% TPR), which that package lacks."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from core.cli import main
from core.runs import RunStore
from core.stats.isic import (
    ISIC_METRIC_NAMES,
    auc_sens_80,
    average_precision,
    isic_scores,
    pauc_80,
    resampled_isic_scores,
)
from core.stats.metrics import compute_metrics
from core.stats.uncertainty import bootstrap_indices, bootstrap_metrics
from tests.conftest import reference_package

# The ISIC scorer calls a lesion malignant when P > 0.5; the project when P >= threshold. The smallest
# double above 0.5 makes the two rules one, also for images scored exactly 0.5 (the tied cases have them).
ISIC_THRESHOLD = float(np.nextafter(0.5, 1.0))

# isic-challenge-scoring 5.6 calls Series.rename(inplace=True), which pandas 3 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in Series.rename")




@pytest.fixture(scope="module")
def isic_classification():
    return reference_package("isic_challenge_scoring.classification", "pip install -r requirements.txt")


def case(name: str, count: int, malignant_share: float, seed: int, decimals: int | None = None):
    """Labels and P(malignant) that separate the classes somewhat; `decimals` rounds them into ties."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < malignant_share).astype(np.int64)
    labels[:2] = [0, 1]  # both classes, however imbalanced
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1.2, count) + 0.8 * (2 * labels - 1))))
    if decimals is not None:
        scores = np.round(scores, decimals)
    return pytest.param(labels, scores, id=name)


def ties_at_the_80_percent_point():
    """Where the ROC curve reaches sensitivity 0.8 is where the two 80% areas begin: here exactly 0.8 at
    the end of a group of tied scores (five malignant images), and 0.8 crossed inside one (six)."""
    scores = np.array([0.9, 0.8, 0.6, 0.6, 0.6, 0.5, 0.4, 0.4, 0.3, 0.2, 0.2, 0.1])
    reached = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    crossed = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0])
    return [pytest.param(reached, scores, id="tpr-0.8-at-a-tie-group-end"),
            pytest.param(crossed, scores, id="tpr-0.8-inside-a-tie-group")]


CASES = [
    case("random", 200, 0.35, seed=0),
    case("random-small", 9, 0.5, seed=1),
    case("imbalanced-3%", 400, 0.03, seed=2),
    case("mostly-malignant", 150, 0.9, seed=3),
    case("ties-1-decimal", 300, 0.3, seed=4, decimals=1),
    case("heavy-ties-imbalanced", 300, 0.08, seed=5, decimals=1),
    pytest.param(np.tile([0, 1, 0, 0], 40), np.repeat([0.2, 0.5, 0.8, 0.5], 40), id="three-scores-only"),
    *ties_at_the_80_percent_point(),
    pytest.param(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.3, 0.6, 0.7, 0.9]), id="perfect"),
    pytest.param(np.array([0, 0, 1, 1, 1]), np.array([0.9, 0.7, 0.6, 0.3, 0.1]), id="reversed"),
]


def isic_package_scores(classification, labels, scores) -> pd.Series:
    """The package's per-category scores of 'malignant' in a two-category (benign, malignant) task, the
    way it scores an ISIC 2017-2019 submission: truth and predictions as probability columns, weight 1."""
    images = pd.Index([f"ISIC_{index:07d}" for index in range(len(labels))], name="image")
    truth = pd.DataFrame({"benign": 1.0 - labels, "malignant": labels.astype(float)}, index=images)
    prediction = pd.DataFrame({"benign": 1.0 - scores, "malignant": scores}, index=images)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=images)
    score = classification.ClassificationScore(truth, prediction, weights, classification.ClassificationMetric.AUC)
    return score.per_category.loc["malignant"]


def isic_2024_pauc(labels, scores, min_tpr: float = 0.80) -> float:
    """The ISIC 2024 Kaggle metric, written out from its notebook "ISIC pAUC-aboveTPR" (N. R. Kurtansky,
    MSKCC; the scikit-learn form given there as equivalent): flip the labels and the scores so that
    TPR >= 0.8 becomes FPR <= 0.2, take scikit-learn's McClish-scaled partial AUC up to that FPR, and
    change its scale from [0.5, 1] back to [0.5 * max_fpr**2, max_fpr]."""
    v_gt = abs(np.asarray(labels) - 1)
    v_pred = -1.0 * np.asarray(scores)
    max_fpr = abs(1 - min_tpr)
    partial_auc_scaled = skm.roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (partial_auc_scaled - 0.5)


@pytest.mark.parametrize("labels, scores", CASES)
def test_scores_equal_the_isic_challenge_scorer(isic_classification, labels, scores):
    expected = isic_package_scores(isic_classification, labels, scores)
    ours = compute_metrics(labels, scores, ISIC_THRESHOLD)
    assert auc_sens_80(labels, scores) == pytest.approx(expected["auc_sens_80"], abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(expected["ap"], abs=1e-9)
    assert ours["auc"] == pytest.approx(expected["auc"], abs=1e-9)
    assert ours["recall"] == pytest.approx(expected["sensitivity"], abs=1e-9)
    assert ours["specificity"] == pytest.approx(expected["specificity"], abs=1e-9)
    assert ours["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)


@pytest.mark.parametrize("labels, scores", CASES)
def test_pauc_80_equals_the_isic_2024_metric(labels, scores):
    assert pauc_80(labels, scores) == pytest.approx(isic_2024_pauc(labels, scores), abs=1e-9)


def test_a_score_of_exactly_one_half_is_benign_to_the_isic_scorer(isic_classification):
    labels, scores = np.array([0, 1, 1, 0]), np.array([0.2, 0.5, 0.9, 0.5])
    expected = isic_package_scores(isic_classification, labels, scores)
    assert expected["sensitivity"] == 0.5 and expected["specificity"] == 1.0
    at_half = compute_metrics(labels, scores, 0.5)
    assert at_half["recall"] == 1.0 and at_half["specificity"] == 0.5, "the project calls P >= threshold malignant"


def test_the_two_80_percent_areas_on_known_curves():
    perfect = np.array([0] * 50 + [1] * 50)
    assert pauc_80(perfect, perfect.astype(float)) == pytest.approx(0.2, abs=1e-12)
    assert auc_sens_80(perfect, perfect.astype(float)) == pytest.approx(1.0, abs=1e-12)
    # Every score shared by as many benign as malignant images: the ROC curve is the diagonal.
    chance_labels, chance_scores = np.tile([0, 1], 5000), np.repeat(np.linspace(0, 1, 100), 100)
    assert pauc_80(chance_labels, chance_scores) == pytest.approx(0.02, abs=1e-12)
    assert auc_sens_80(chance_labels, chance_scores) == pytest.approx(0.18, abs=1e-12)
    labels, scores = case("numeric", 400, 0.35, seed=6).values
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    sensitivities = np.linspace(0.8, 1, 20001)
    numeric = np.trapezoid(1 - np.interp(sensitivities, tpr, fpr), sensitivities)
    assert pauc_80(labels, scores) == pytest.approx(numeric, abs=2e-3)


def test_undefined_scores_are_nan():
    for labels in ([0, 0, 0], [1, 1, 1], []):
        scores = np.linspace(0.1, 0.9, len(labels))
        result = isic_scores(labels, scores)
        assert np.isnan(result["auc_sens_80"]) and np.isnan(result["pauc_80"])
    assert np.isnan(average_precision([0, 0], [0.3, 0.6]))
    assert average_precision([1, 1], [0.3, 0.6]) == 1.0, "all malignant: precision is 1 everywhere"


@pytest.mark.parametrize("labels, scores", [case for case in CASES if case.id in (
    "imbalanced-3%", "heavy-ties-imbalanced", "tpr-0.8-inside-a-tie-group")])
def test_each_resample_is_scored_like_the_images_it_drew(labels, scores):
    indices = bootstrap_indices(len(labels), resamples=40, seed=1)
    resampled = resampled_isic_scores(labels, scores, indices)
    for row, drawn in enumerate(indices):
        expected = isic_scores(labels[drawn], scores[drawn])
        for name in ISIC_METRIC_NAMES:
            assert resampled[name][row] == pytest.approx(expected[name], abs=1e-12, nan_ok=True), (name, row)


def test_a_resample_without_a_malignant_image_has_no_isic_score():
    labels, scores = np.array([1, 0, 0, 0, 0]), np.array([0.9, 0.1, 0.4, 0.3, 0.8])
    resampled = resampled_isic_scores(labels, scores, np.array([[1, 2, 2, 3, 4], [0, 1, 2, 3, 4]]))
    assert all(np.isnan(resampled[name][0]) for name in ISIC_METRIC_NAMES)
    assert [resampled[name][1] for name in ISIC_METRIC_NAMES] == [1.0, pytest.approx(0.2), 1.0]


def test_bootstrap_intervals_of_the_isic_scores(isic_classification):
    labels, scores = case("random", 200, 0.35, seed=0).values
    intervals = bootstrap_metrics(labels, scores, resamples=300, seed=2)
    expected = isic_package_scores(isic_classification, labels, scores)
    assert intervals["auc_sens_80"].value == pytest.approx(expected["auc_sens_80"], abs=1e-9)
    assert intervals["average_precision"].value == pytest.approx(expected["ap"], abs=1e-9)
    for name in ISIC_METRIC_NAMES:
        assert intervals[name].low < intervals[name].value < intervals[name].high, name


def test_cli_csv_heads_the_isic_columns_by_their_names(isic_classification, tmp_path, capsys):
    labels, scores = case("random", 200, 0.35, seed=0).values
    store = RunStore(tmp_path / "runs")
    folder = store.create("resnet18", {"config": {"threshold": 0.5}})
    predictions = pd.DataFrame({"image_id": [f"ISIC_{index:07d}" for index in range(len(labels))],
                                "split": "test", "label": labels, "prob_malignant": scores})
    validation = predictions.head(20).assign(split="val")
    folder.save_table("predictions.csv", pd.concat([validation, predictions]))
    folder.update(status="completed")
    assert main(["compare", "--runs-dir", str(store.root), "--format", "csv", "--resamples", "200"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    for name in ISIC_METRIC_NAMES:
        assert [name, f"{name} low", f"{name} high"] == [column for column in table.columns
                                                          if column.startswith(name)]
    expected = isic_package_scores(isic_classification, labels, scores)
    row = table.iloc[0]
    # The CSV rounds to four decimals.
    assert row["auc_sens_80"] == pytest.approx(expected["auc_sens_80"], abs=5e-5)
    assert row["average_precision"] == pytest.approx(expected["ap"], abs=5e-5)
    assert row["pauc_80"] == pytest.approx(isic_2024_pauc(labels, scores), abs=5e-5)
