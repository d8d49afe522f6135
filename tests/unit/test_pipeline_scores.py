"""Evaluation metrics, calibration and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from model_export import scores

LABELS = ("glioma", "meningioma", "notumor", "pituitary")


def one_hot_logits(pred: list[int], n: int = 4, scale: float = 10.0) -> np.ndarray:
    logits = np.zeros((len(pred), n))
    logits[np.arange(len(pred)), pred] = scale
    return logits


def test_per_class_metrics_match_hand_counts() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    y_pred = np.array([0, 0, 1, 1, 0, 2, 2, 3])
    report = scores.classification_report(one_hot_logits(list(y_pred)), y_true, LABELS)
    glioma = report["per_class"]["glioma"]
    # glioma: tp 2, fn 1, fp 1, tn 4
    assert glioma["precision"] == pytest.approx(2 / 3)
    assert glioma["recall"] == pytest.approx(2 / 3)
    assert glioma["specificity"] == pytest.approx(4 / 5)
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert report["confusion_matrix"][0] == [2, 1, 0, 0]
    f1 = [report["per_class"][c]["f1"] for c in LABELS]
    assert report["macro_f1"] == pytest.approx(np.mean(f1))
    assert report["weighted_f1"] == pytest.approx(np.average(f1, weights=[3, 2, 2, 1]))


def test_tumour_sensitivity_and_specificity_use_notumor_as_the_negative_class() -> None:
    y_true = np.array([0, 1, 2, 2, 3])
    y_pred = [0, 2, 2, 0, 3]  # one tumour called no-tumour, one no-tumour called tumour
    report = scores.classification_report(one_hot_logits(y_pred), y_true, LABELS, threshold=0.5)
    assert report["tumour_sensitivity"] == pytest.approx(2 / 3)
    assert report["tumour_specificity"] == pytest.approx(1 / 2)


def test_subset_of_labels_reports_only_present_classes_in_macro_average() -> None:
    y_true = np.array([0, 1, 3, 3])  # no notumor images, as in figshare-cheng
    report = scores.classification_report(one_hot_logits([0, 1, 3, 2]), y_true, LABELS)
    assert report["present_labels"] == ["glioma", "meningioma", "pituitary"]
    assert report["macro_f1"] == pytest.approx(np.mean([1.0, 1.0, 2 / 3]))
    assert "roc_auc" not in report["per_class"]["notumor"]
    assert report["tumour_specificity"] is None


def test_roc_auc_is_one_for_perfect_ranking() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    report = scores.classification_report(one_hot_logits(list(y)) + rng.normal(0, 0.1, (40, 4)), y, LABELS)
    assert report["macro_roc_auc"] == pytest.approx(1.0)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 4))
    probs = scores.softmax(logits, 2.5)
    y = np.array([rng.choice(4, p=p) for p in probs])
    assert scores.fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)


def test_temperature_scaling_lowers_ece_of_overconfident_logits() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (3000, 4))
    y = np.array([rng.choice(4, p=p) for p in scores.softmax(logits, 3.0)])
    overconfident = logits  # true temperature is 3: T=1 is overconfident
    t = scores.fit_temperature(overconfident, y)
    before = scores.expected_calibration_error(scores.softmax(overconfident), y)
    after = scores.expected_calibration_error(scores.softmax(overconfident, t), y)
    assert after < before / 2


def test_macro_f1_ignores_classes_absent_from_truth() -> None:
    assert scores.macro_f1(np.array([0, 0, 1]), np.array([0, 0, 1]), 4) == pytest.approx(1.0)
