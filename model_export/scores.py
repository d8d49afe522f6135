"""Calibration (temperature scaling) for training, and the classification metrics it reports.

The metrics and their names are defined once in ``app.core.metrics`` (``btd validate`` measures a
site's data with them too); they are re-exported here so the pipeline reads ``scores.ACCURACY``,
``scores.classification_report`` and so on from one module.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from app.core.decision import softmax  # the service's decision
from app.core.metrics import (
    ACCURACY,
    ECE,
    ECE_BINS,
    ECE_CALIBRATED,
    MACRO_AUC,
    MACRO_F1,
    TUMOUR_SENSITIVITY,
    TUMOUR_SPECIFICITY,
    WEIGHTED_F1,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    per_class_metrics,
    roc_curves,
)

__all__ = ["ACCURACY", "ECE", "ECE_BINS", "ECE_CALIBRATED", "MACRO_AUC", "MACRO_F1", "TUMOUR_SENSITIVITY",
           "TUMOUR_SPECIFICITY", "WEIGHTED_F1", "classification_report", "confusion_matrix",
           "expected_calibration_error", "fit_temperature", "macro_f1", "nll", "per_class_metrics", "roc_curves",
           "softmax"]


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017)."""
    result = minimize_scalar(lambda log_t: nll(logits, y_true, math.exp(log_t)), bounds=(-3.0, 3.0),
                             method="bounded")
    return float(math.exp(result.x))
