"""Classification metrics, calibration and temperature scaling, on numpy arrays (no torch).

Metric names are defined here once; the JSON report, the Markdown report and the model's
metadata all use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score, roc_curve

from app.core.contract import NO_TUMOUR_LABEL
from app.core.decision import calls_tumour, softmax, tumour_probability  # the service's decision

__all__ = ["softmax"]

ACCURACY = "accuracy"
MACRO_F1 = "macro_f1"
WEIGHTED_F1 = "weighted_f1"
MACRO_AUC = "macro_roc_auc"
ECE = "ece"
ECE_CALIBRATED = "ece_calibrated"
TUMOUR_SENSITIVITY = "tumour_sensitivity"
TUMOUR_SPECIFICITY = "tumour_specificity"
ECE_BINS = 15


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


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017)."""
    result = minimize_scalar(lambda log_t: nll(logits, y_true, math.exp(log_t)), bounds=(-3.0, 3.0),
                             method="bounded")
    return float(math.exp(result.x))


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
    rows and the macro averages then cover the classes present in ``y_true``."""
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
        report["threshold"] = float(threshold)
        report[TUMOUR_SENSITIVITY] = _ratio((called & is_tumour).sum(), is_tumour.sum()) if is_tumour.any() else None
        report[TUMOUR_SPECIFICITY] = (
            _ratio((~called & ~is_tumour).sum(), (~is_tumour).sum()) if (~is_tumour).any() else None
        )
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
