"""pneumo_edge.evaluation.metrics against cases computed by hand."""

import math

import numpy as np
import pytest

from pneumo_edge.evaluation.metrics import (
    binary_metrics,
    choose_threshold,
    confusion_matrix,
    roc_auc,
    validate_threshold_rule,
)


def test_hand_computed_case():
    # truth:  1 1 1 1 0 0 0 0 0 0 ; scores chosen so that at 0.5: tp=3 fn=1 fp=2 tn=4
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05]
    m = binary_metrics(y, p, 0.5)
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # AUC = share of (pos, neg) pairs ranked correctly: 0.9 and 0.8 beat all 6 negatives (12),
    # 0.6 beats 0.55, 0.4, 0.2, 0.1, 0.05 (5), 0.3 beats 0.2, 0.1, 0.05 (3): 20 of 24
    assert m["roc_auc"] == pytest.approx(20 / 24)


def test_auc_ties_count_half_and_degenerate_cases():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.3, 0.4]))


def test_undefined_ratios_are_zero_not_errors():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0


def test_confusion_layout():
    cm = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 0, 1, 1])
    assert cm.tolist() == [[1, 1], [1, 2]]


def test_threshold_f1_separates_separable_data():
    y = np.array([0] * 5 + [1] * 5)
    p = np.array([0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9])
    t = choose_threshold(y, p, "f1")
    assert 0.3 < t < 0.35  # midpoint between the classes' closest scores
    assert binary_metrics(y, p, t)["f1"] == 1.0


def test_threshold_recall_target_is_met_with_the_highest_threshold():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.7, 0.4, 0.2, 0.6, 0.3, 0.1, 0.05])
    t = choose_threshold(y, p, "recall:0.75")
    assert binary_metrics(y, p, t)["recall"] >= 0.75
    assert 0.3 < t < 0.4  # higher thresholds lose the 0.4 positive
    assert choose_threshold(y, p, "recall:1.0") < 0.2


def test_fixed_and_bad_rules():
    assert choose_threshold([0, 1], [0.2, 0.8], "fixed:0.3") == 0.3
    for bad in ("f2", "recall:1.5", "fixed:x", "f1:3"):
        with pytest.raises(ValueError):
            validate_threshold_rule(bad)
