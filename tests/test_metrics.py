import math

import numpy as np
import pytest
from sklearn import metrics as skm

from core.stats.metrics import METRIC_NAMES, compute_metrics


def test_hand_computed_example():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    probabilities = [0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.3, 0.05]
    result = compute_metrics(labels, probabilities, threshold=0.5)
    # tp=3, fn=1, fp=1, tn=5
    assert result["confusion_matrix"] == [[5, 1], [1, 3]]
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["precision"] == pytest.approx(0.75)
    assert result["recall"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(5 / 6)
    assert result["f1"] == pytest.approx(0.75)
    assert result["g_mean"] == pytest.approx(math.sqrt(0.75 * 5 / 6))
    assert result["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    po, pe = 0.8, 0.4 * 0.4 + 0.6 * 0.6
    assert result["kappa"] == pytest.approx((po - pe) / (1 - pe))
    # AUC: positive-negative pairs ranked right (ties count half): 6 + 6 + 5 + 3.5 of 24
    assert result["auc"] == pytest.approx(20.5 / 24)


def test_agrees_with_scikit_learn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probabilities = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    result = compute_metrics(labels, probabilities, threshold=0.4)
    predicted = (probabilities >= 0.4).astype(int)
    assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities))
    assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, predicted))
    assert result["kappa"] == pytest.approx(skm.cohen_kappa_score(labels, predicted))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert result["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert set(METRIC_NAMES) <= set(result)


def test_undefined_values_are_nan_not_guesses():
    result = compute_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(result["auc"]) and math.isnan(result["recall"]) and math.isnan(result["precision"])
    assert result["specificity"] == 1.0 and result["accuracy"] == 1.0
