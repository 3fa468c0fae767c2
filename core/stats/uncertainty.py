"""Statistics for comparing models on the same test images: bootstrap confidence intervals, DeLong's
test for correlated AUCs, McNemar's test, calibration, and screening operating points.

The paper reports point estimates on about 212 test images; differences of 1-3 points between its
models are within the noise that these intervals and tests make visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats
from sklearn import metrics as skm

from core.formatting import format_interval
from core.stats.isic import ISIC_METRIC_NAMES, isic_scores, resampled_isic_scores
from core.stats.metrics import METRIC_NAMES, compute_metrics

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


def metrics_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Every threshold metric of METRIC_NAMES (all but AUC) from confusion counts; arrays in, arrays
    out, so thousands of bootstrap resamples are computed at once. Undefined values are NaN."""
    tp, fp, tn, fn = (np.asarray(value, dtype=np.float64) for value in (tp, fp, tn, fn))
    total = tp + fp + tn + fn

    def ratio(numerator, denominator):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)

    recall, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    accuracy = ratio(tp + tn, total)
    expected = ratio((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn), total**2)
    return {
        "accuracy": accuracy,
        "precision": ratio(tp, tp + fp),
        "recall": recall,
        "specificity": specificity,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "kappa": ratio(accuracy - expected, 1 - expected),
        "g_mean": np.sqrt(recall * specificity),
        "mcc": ratio(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))),
        "balanced_accuracy": (recall + specificity) / 2,
    }


def bootstrap_indices(count: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """resamples x count indices drawn with replacement. Using the same indices for every model makes
    the intervals of models tested on the same images comparable (a paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def resampled_auc(labels: np.ndarray, probabilities: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """AUC of every resample (rows of `indices`) by the Mann-Whitney rank formula; NaN for a resample
    with one class only."""
    sampled_labels, sampled_scores = labels[indices], probabilities[indices]
    ranks = scipy_stats.rankdata(sampled_scores, axis=1)
    positives = sampled_labels.sum(1)
    negatives = sampled_labels.shape[1] - positives
    rank_sum = (ranks * sampled_labels).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def format(self, digits: int = 3) -> str:
        return format_interval(self.value, self.low, self.high, digits)


def bootstrap_metrics(labels, probabilities, threshold: float = 0.5, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED, level: float = 0.95) -> dict[str, Interval]:
    """Every metric of METRIC_NAMES and ISIC_METRIC_NAMES with a percentile bootstrap interval (test
    images resampled)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    point = compute_metrics(labels, probabilities, threshold) | isic_scores(labels, probabilities)
    indices = bootstrap_indices(len(labels), resamples, seed)
    sampled_labels = labels[indices]
    called = probabilities[indices] >= threshold
    tp = (called & (sampled_labels == 1)).sum(1)
    fp = (called & (sampled_labels == 0)).sum(1)
    fn = (~called & (sampled_labels == 1)).sum(1)
    tn = (~called & (sampled_labels == 0)).sum(1)
    samples = metrics_from_counts(tp, fp, tn, fn)
    samples["auc"] = resampled_auc(labels, probabilities, indices)
    samples.update(resampled_isic_scores(labels, probabilities, indices))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name in METRIC_NAMES + ISIC_METRIC_NAMES:
        values = samples[name][np.isfinite(samples[name])]
        if len(values) == 0 or not math.isfinite(point[name]):
            intervals[name] = Interval(point[name], math.nan, math.nan)
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = Interval(float(point[name]), float(low), float(high))
    return intervals


def mean_interval(values, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  level: float = 0.95) -> Interval:
    """The mean of per-image values with a percentile bootstrap interval over the images; NaN values (an
    image with nothing to measure) are left out, and an empty set gives NaN throughout."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(math.nan, math.nan, math.nan)
    means = values[bootstrap_indices(len(values), resamples, seed)].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))


@dataclass(frozen=True)
class PairedTest:
    statistic: float
    p_value: float
    difference: float  # first minus second (AUC for DeLong, accuracy for McNemar)


def delong_test(labels, probabilities_a, probabilities_b) -> PairedTest:
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs on the same images, with the
    fast midrank algorithm of Sun & Xu (2014). Two-sided p-value of z = (AUC_a - AUC_b) / SE."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.vstack([np.asarray(probabilities_a, dtype=np.float64), np.asarray(probabilities_b, np.float64)])
    positive, negative = scores[:, labels == 1], scores[:, labels == 0]
    m, n = positive.shape[1], negative.shape[1]
    if m < 2 or n < 2:
        return PairedTest(math.nan, math.nan, math.nan)
    ranks_positive = scipy_stats.rankdata(positive, axis=1)
    ranks_negative = scipy_stats.rankdata(negative, axis=1)
    ranks_all = scipy_stats.rankdata(np.hstack([positive, negative]), axis=1)
    aucs = (ranks_all[:, :m].sum(1) / m - (m + 1) / 2) / n
    placements_positive = (ranks_all[:, :m] - ranks_positive) / n  # V10: per positive image
    placements_negative = 1 - (ranks_all[:, m:] - ranks_negative) / m  # V01: per negative image
    covariance = np.cov(placements_positive) / m + np.cov(placements_negative) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = float(aucs[0] - aucs[1])
    if variance <= 1e-15:
        return PairedTest(0.0 if abs(difference) < 1e-12 else math.inf, 1.0 if abs(difference) < 1e-12 else 0.0,
                          difference)
    z = difference / math.sqrt(variance)
    return PairedTest(float(z), float(2 * scipy_stats.norm.sf(abs(z))), difference)


def mcnemar_test(labels, predictions_a, predictions_b) -> PairedTest:
    """McNemar's test of two classifiers' accuracy on the same images: exact binomial on the
    discordant pairs when there are fewer than 25 of them, chi-square with continuity correction
    otherwise."""
    labels = np.asarray(labels)
    right_a = np.asarray(predictions_a) == labels
    right_b = np.asarray(predictions_b) == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    difference = float(right_a.mean() - right_b.mean()) if len(labels) else math.nan
    discordant = only_a + only_b
    if discordant == 0:
        return PairedTest(0.0, 1.0, difference)
    if discordant < 25:
        return PairedTest(float(min(only_a, only_b)),
                          float(scipy_stats.binomtest(only_a, discordant, 0.5).pvalue), difference)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return PairedTest(float(statistic), float(scipy_stats.chi2.sf(statistic, 1)), difference)


@dataclass(frozen=True)
class Calibration:
    bin_centres: list[float]  # mean predicted probability per non-empty bin
    observed: list[float]  # share of malignant per bin
    counts: list[int]
    expected_calibration_error: float
    brier_score: float


def calibration(labels, probabilities, bins: int = 10) -> Calibration:
    """Reliability diagram data (equal-width bins), expected calibration error (count-weighted gap
    between confidence and frequency) and Brier score."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    which = np.clip((probabilities * bins).astype(int), 0, bins - 1)
    centres, observed, counts = [], [], []
    error = 0.0
    for bin_index in range(bins):
        members = which == bin_index
        if not members.any():
            continue
        centres.append(float(probabilities[members].mean()))
        observed.append(float(labels[members].mean()))
        counts.append(int(members.sum()))
        error += members.sum() / len(labels) * abs(centres[-1] - observed[-1])
    return Calibration(centres, observed, counts, float(error), float(skm.brier_score_loss(labels, probabilities)))


def threshold_for_sensitivity(labels, probabilities, sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these images is at least `sensitivity` (choose it
    on validation predictions, then report test specificity there: the screening operating point)."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.sort(np.asarray(probabilities, dtype=np.float64)[labels == 1])[::-1]
    if len(scores) == 0:
        return math.nan
    needed = math.ceil(sensitivity * len(scores) - 1e-9)
    return float(scores[max(needed, 1) - 1])
