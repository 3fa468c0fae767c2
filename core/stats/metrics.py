"""Binary classification metrics at a decision threshold, from labels and P(malignant).

scikit-learn computes everything it has; only specificity and G-mean are derived here. Values that
are undefined (AUC with one class present, precision with no positive call) are NaN, never a guess.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = (
    "accuracy", "precision", "recall", "specificity", "f1", "auc",
    "kappa", "g_mean", "mcc", "balanced_accuracy",
)


def predict_labels(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return (np.asarray(probabilities) >= threshold).astype(np.int64)


def confusion_counts(labels: np.ndarray, predictions: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp), with benign = 0 as the negative class."""
    tn, fp, fn, tp = skm.confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def safe_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(skm.roc_auc_score(labels, probabilities))


def compute_metrics(labels, probabilities, threshold: float = 0.5) -> dict:
    """Every metric of METRIC_NAMES plus the confusion matrix [[tn, fp], [fn, tp]] and the count."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = predict_labels(probabilities, threshold)
    tn, fp, fn, tp = confusion_counts(labels, predictions)
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    both_classes = len(np.unique(labels)) == 2
    result = {
        "accuracy": float(skm.accuracy_score(labels, predictions)) if len(labels) else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": sensitivity,
        "specificity": specificity,
        "f1": float(skm.f1_score(labels, predictions, zero_division=np.nan)) if tp + fp + fn else math.nan,
        "auc": safe_auc(labels, probabilities),
        "kappa": _kappa(labels, predictions),
        "g_mean": math.sqrt(sensitivity * specificity) if both_classes else math.nan,
        "mcc": float(skm.matthews_corrcoef(labels, predictions)) if both_classes else math.nan,
        "balanced_accuracy": (sensitivity + specificity) / 2 if both_classes else math.nan,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "count": int(len(labels)),
        "threshold": float(threshold),
    }
    return result


def _kappa(labels: np.ndarray, predictions: np.ndarray) -> float:
    # sklearn returns NaN with a warning when expected agreement is 1 (one class everywhere).
    if len(np.unique(np.concatenate([labels, predictions]))) < 2:
        return math.nan
    return float(skm.cohen_kappa_score(labels, predictions))


def roc_curve(labels, probabilities) -> dict[str, list[float]]:
    fpr, tpr, thresholds = skm.roc_curve(labels, probabilities)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def precision_recall_curve(labels, probabilities) -> dict[str, list[float]]:
    precision, recall, thresholds = skm.precision_recall_curve(labels, probabilities)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thresholds.tolist()}
