"""Classification metrics on numpy arrays, with their 95% intervals: defined once here for the
training pipeline's evaluation (``model_export.scores`` re-exports them, and the model's metadata
``btd.metrics`` is written with these names) and for a site's acceptance test (``btd validate``).

Needs the ``report`` extra (scikit-learn, scipy); the service itself never imports this module.

Intervals: Wilson score intervals for proportions (accuracy, sensitivity, specificity, the
not-assessed share: right near 0 and 1, where a site's figures sit, unlike the normal
approximation); percentile bootstrap over images for macro F1 and macro ROC AUC, which are not
proportions (vectorised: a thousand resamples of a few thousand images take well under a second).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from statistics import NormalDist

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from app.core.contract import NO_TUMOUR_LABEL
from app.core.decision import calls_tumour, softmax, tumour_probability  # the service's decision

ACCURACY = "accuracy"
MACRO_F1 = "macro_f1"
WEIGHTED_F1 = "weighted_f1"
MACRO_AUC = "macro_roc_auc"
ECE = "ece"
ECE_CALIBRATED = "ece_calibrated"
TUMOUR_SENSITIVITY = "tumour_sensitivity"
TUMOUR_SPECIFICITY = "tumour_specificity"
ECE_BINS = 15
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def per_class_metrics(cm: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    total = cm.sum()
    out = {}
    for i, label in enumerate(labels):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        out[label] = {
            "precision": precision,
            "recall": recall,  # = sensitivity
            "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(cm[i].sum()),
        }
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in ``y_true`` (absent classes would count as 0)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = cm.sum(axis=1) > 0
    f1 = [m["f1"] for m, p in zip(per_class_metrics(cm, range(num_classes)).values(), present) if p]
    return float(np.mean(f1)) if f1 else 0.0


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram's bins (equal-width on the top-label confidence, (lo, hi]): for each
    non-empty one its edges, images, mean confidence and accuracy."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in pairwise(edges):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            out.append({"lo": float(lo), "hi": float(hi), "images": int(mask.sum()),
                        "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return out


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins (those of :func:`reliability_bins`)."""
    n = len(y_true)
    return float(sum(b["images"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, y_true, bins)))


def classification_report(
    logits: np.ndarray,
    y_true: np.ndarray,
    labels: Sequence[str],
    *,
    temperature: float = 1.0,
    threshold: float = 0.5,
) -> dict:
    """All metrics for one set of predictions. ``labels`` are the model's classes (logit order);
    ``y_true`` may cover only some of them (e.g. a 3-class test set for a 4-class model): per-class
    rows and the macro averages then cover the classes present in ``y_true``. ``tumour_counts`` holds
    the counts behind the tumour sensitivity and specificity (for their intervals)."""
    labels = list(labels)
    n_classes = len(labels)
    probs = softmax(logits)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    per_class = per_class_metrics(cm, labels)
    present = [label for i, label in enumerate(labels) if cm[i].sum() > 0]
    supports = np.array([per_class[label]["support"] for label in present], dtype=np.float64)
    f1s = np.array([per_class[label]["f1"] for label in present])
    aucs: dict[str, float] = {}
    for i, label in enumerate(labels):
        positives = y_true == i
        if positives.any() and (~positives).any():
            aucs[label] = float(roc_auc_score(positives, probs[:, i]))
            per_class[label]["roc_auc"] = aucs[label]
    calibrated = softmax(logits, temperature)
    report = {
        "images": len(y_true),
        "labels": labels,
        "present_labels": present,
        ACCURACY: float((y_pred == y_true).mean()),
        MACRO_F1: float(f1s.mean()),
        WEIGHTED_F1: float((f1s * supports).sum() / supports.sum()),
        MACRO_AUC: float(np.mean(list(aucs.values()))) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        ECE: expected_calibration_error(probs, y_true),
        "temperature": float(temperature),
        ECE_CALIBRATED: expected_calibration_error(calibrated, y_true),
    }
    tumour = tumour_probability(calibrated, labels)
    if tumour is not None:
        is_tumour = y_true != labels.index(NO_TUMOUR_LABEL)
        called = calls_tumour(tumour, threshold)
        counts = {"true_positives": int((called & is_tumour).sum()), "tumours": int(is_tumour.sum()),
                  "true_negatives": int((~called & ~is_tumour).sum()), "no_tumours": int((~is_tumour).sum())}
        report["threshold"] = float(threshold)
        report["tumour_counts"] = counts
        report[TUMOUR_SENSITIVITY] = (_ratio(counts["true_positives"], counts["tumours"])
                                      if counts["tumours"] else None)
        report[TUMOUR_SPECIFICITY] = (_ratio(counts["true_negatives"], counts["no_tumours"])
                                      if counts["no_tumours"] else None)
    return report


def roc_curves(logits: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict[str, tuple]:
    """One-vs-rest ROC curve (fpr, tpr) per class present with both outcomes."""
    probs = softmax(logits)
    curves = {}
    for i, label in enumerate(labels):
        positives = y_true == i
        if positives.any() and (~positives).any():
            fpr, tpr, _ = roc_curve(positives, probs[:, i])
            curves[label] = (fpr, tpr)
    return curves


# ---------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``successes / n`` (None when n is 0)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _resampled_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 (classes present in each row's truth, as :func:`macro_f1`) of each row of [B, n]."""
    b = y_true.shape[0]
    codes = (np.arange(b)[:, None] * num_classes + y_true) * num_classes + y_pred
    cm = np.bincount(codes.ravel(), minlength=b * num_classes * num_classes).reshape(b, num_classes, num_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    present = support > 0
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def _resampled_macro_auc(y_true: np.ndarray, probs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest ROC AUC of each resample (row of ``index``, [B, n], into ``y_true`` and
    ``probs`` [n, C]), by the Mann-Whitney statistic (the area sklearn computes, ties counting half),
    over the classes with both outcomes in the row; NaN for a row with none."""
    aucs = []
    for c in range(probs.shape[1]):
        positive = y_true[index] == c
        n_pos = positive.sum(axis=1).astype(np.float64)
        n_neg = index.shape[1] - n_pos
        ranks = rankdata(probs[:, c][index], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = ((ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        aucs.append(np.where((n_pos > 0) & (n_neg > 0), auc, np.nan))
    stacked = np.stack(aucs, axis=1)
    valid = ~np.isnan(stacked)
    return np.where(valid.any(axis=1), np.nansum(stacked, axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)


# Resampled values held at once (a chunk of resamples x images): bounds the bootstrap's memory (~100 MB).
BOOTSTRAP_CHUNK_VALUES = 2_000_000


def bootstrap_intervals(logits: np.ndarray, y_true: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals (images resampled with replacement) of ``MACRO_F1`` and
    ``MACRO_AUC`` as :func:`classification_report` computes them; None when there are under two images
    or no resample defines the figure."""
    n, num_classes = logits.shape
    if n < 2 or resamples < 1:
        return {MACRO_F1: None, MACRO_AUC: None}
    probs = softmax(logits)
    predicted = probs.argmax(axis=1)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK_VALUES // n)
    f1s, aucs = [], []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        f1s.append(_resampled_macro_f1(y_true[index], predicted[index], num_classes))
        aucs.append(_resampled_macro_auc(y_true, probs, index))
    tails = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)
    out: dict[str, tuple[float, float] | None] = {}
    for name, values in ((MACRO_F1, np.concatenate(f1s)), (MACRO_AUC, np.concatenate(aucs))):
        values = values[~np.isnan(values)]
        out[name] = tuple(float(v) for v in np.percentile(values, tails)) if len(values) else None
    return out
