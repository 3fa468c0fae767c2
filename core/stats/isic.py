"""The ISIC challenges' ranking scores of a malignant-vs-benign classifier, computed as the challenges'
own scorers compute them, so that a number here can be set beside a leaderboard's.

- `auc_sens_80`: ISIC 2017-2019 scored melanoma by the area under the ROC curve to the right of where the
  curve first reaches 80% sensitivity (`isic-challenge-scoring`'s `auc_above_sensitivity`); 0 to 1.
- `pauc_80`: ISIC 2024 scored the area under the ROC curve inside the band TPR >= 0.8 (its Kaggle
  metric, "pAUC above 80% TPR"); 0 to 0.2. A different area from `auc_sens_80`, on a different scale.
- `average_precision`: the package's `ap` (scikit-learn's uninterpolated average precision).

Each score is computed for many bootstrap resamples at once (one row of indices per resample); the
value itself is the one-row case, so the intervals and the value come from the same code.
"""

from __future__ import annotations

import numpy as np

ISIC_METRIC_NAMES = ("auc_sens_80", "pauc_80", "average_precision")
MIN_SENSITIVITY = 0.8
# Resamples x images handled at once: bounds the memory of the per-resample arrays.
CELLS_PER_CHUNK = 2_000_000


def auc_sens_80(labels, scores) -> float:
    """ISIC 2017-2019's "AUC above 80% sensitivity", as `isic_challenge_scoring.metrics.auc_above_sensitivity`
    (threshold 0.80) computes it: the area under the ROC curve from the point where it first reaches
    sensitivity 0.8 (interpolated along the ROC segment that crosses it) to (1, 1), unnormalised, so 1 for
    a perfect model and about 0.18 for a random one. NaN without both classes."""
    return isic_scores(labels, scores)["auc_sens_80"]


def pauc_80(labels, scores) -> float:
    """ISIC 2024's "pAUC above 80% TPR": the area under the ROC curve where sensitivity is at least 0.8,
    from 0 to 0.2 (about 0.02 for a random model). The challenge's Kaggle metric ("ISIC pAUC-aboveTPR",
    N. R. Kurtansky) flips the labels and negates the scores so that TPR >= 0.8 becomes FPR <= 0.2, then
    takes the partial area up to FPR 0.2 (or, equivalently, undoes the McClish scaling of scikit-learn's
    `roc_auc_score(max_fpr=0.2)`). Here it is auc_sens_80's area less the rectangle under sensitivity 0.8
    that area includes. NaN without both classes."""
    return isic_scores(labels, scores)["pauc_80"]


def average_precision(labels, scores) -> float:
    """Average precision as `isic_challenge_scoring.metrics.average_precision` computes it (scikit-learn's
    `average_precision_score`): the sum over distinct scores of the recall gained there times the
    precision there. NaN without a malignant image."""
    return isic_scores(labels, scores)["average_precision"]


def isic_scores(labels, scores) -> dict[str, float]:
    """All of ISIC_METRIC_NAMES at once (one ranking of the images instead of three)."""
    count = len(np.asarray(labels))
    resampled = resampled_isic_scores(labels, scores, np.arange(count)[None, :])
    return {name: float(values[0]) for name, values in resampled.items()}


def resampled_isic_scores(labels, scores, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Each of ISIC_METRIC_NAMES for every resample (rows of `indices`); NaN where a resample lacks a
    class the score needs."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
    if indices.shape[1] == 0:
        return {name: np.full(len(indices), np.nan) for name in ISIC_METRIC_NAMES}
    rows = max(1, CELLS_PER_CHUNK // indices.shape[1])
    parts = [_scores_of_rows(labels, scores, indices[start:start + rows])
             for start in range(0, len(indices), rows)]
    return {name: np.concatenate([part[name] for part in parts]) if parts else np.empty(0)
            for name in ISIC_METRIC_NAMES}


def _scores_of_rows(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    true_positives, false_positives = _roc_counts(labels, scores, indices)
    positives, negatives = true_positives[:, -1:], false_positives[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = true_positives / positives, false_positives / negatives
        precision = true_positives[:, 1:] / (true_positives[:, 1:] + false_positives[:, 1:])
        recall_gained = np.diff(true_positives, axis=1) / positives
    both_classes = (positives[:, 0] > 0) & (negatives[:, 0] > 0)
    area_right, start_fpr = _area_right_of_sensitivity(fpr, tpr)
    # Right of where the curve reaches 0.8 it stays at or above 0.8, so ISIC 2017's area is ISIC 2024's
    # band (TPR >= 0.8 under the curve) plus the rectangle below 0.8 there.
    band = area_right - MIN_SENSITIVITY * (1 - start_fpr)
    return {
        "auc_sens_80": np.where(both_classes, area_right, np.nan),
        "pauc_80": np.where(both_classes, band, np.nan),
        # Where a resample drew nothing yet, precision is 0 / 0, but no recall is gained there.
        "average_precision": np.where(positives[:, 0] > 0,
                                      np.where(recall_gained > 0, recall_gained * precision, 0.0).sum(1), np.nan),
    }


def _roc_counts(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true- and false-positive counts of each resample at every distinct score of the whole
    set, highest first, with the origin in front: rows x (distinct scores + 1). These are sklearn's
    roc_curve points (one per distinct score) plus repeats, where a score is not drawn, that add no area.
    Counting images per score instead of sorting each resample keeps this linear in the images."""
    distinct, score_group = np.unique(-scores, return_inverse=True)
    groups, resamples = len(distinct), len(indices)
    cell = (np.arange(resamples)[:, None] * groups + score_group[indices]).ravel()
    drawn = np.bincount(cell, minlength=resamples * groups).reshape(resamples, groups)
    malignant = labels[indices].ravel() == 1
    drawn_positive = np.bincount(cell[malignant], minlength=resamples * groups).reshape(resamples, groups)
    origin = np.zeros((resamples, 1), dtype=np.int64)
    return (np.hstack([origin, np.cumsum(drawn_positive, axis=1)]),
            np.hstack([origin, np.cumsum(drawn - drawn_positive, axis=1)]))


def _area_right_of_sensitivity(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """auc_above_sensitivity's area per row, and the fpr where it starts: from the first ROC point with
    tpr >= 0.8 (tpr exactly 0.8 included, as its searchsorted(side='left') does), back along the segment
    that crosses 0.8, to (1, 1)."""
    rows = np.arange(len(tpr))
    first = np.maximum(np.argmax(tpr >= MIN_SENSITIVITY, axis=1), 1)  # tpr[:, 0] is 0: never the first
    tpr_before, tpr_at = tpr[rows, first - 1], tpr[rows, first]
    fpr_before, fpr_at = fpr[rows, first - 1], fpr[rows, first]
    with np.errstate(invalid="ignore", divide="ignore"):
        start_fpr = fpr_before + (fpr_at - fpr_before) * (MIN_SENSITIVITY - tpr_before) / (tpr_at - tpr_before)
    head = (fpr_at - start_fpr) * (MIN_SENSITIVITY + tpr_at) / 2
    trapezoids = np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2
    after_first = np.arange(1, tpr.shape[1]) > first[:, None]
    return head + np.where(after_first, trapezoids, 0.0).sum(1), start_fpr
