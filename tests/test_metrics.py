import math

import numpy as np
import pytest

from animl_retrain.modeling.metrics import classification_report


def test_hand_computed_report():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    r = classification_report(y, p, ["a", "b", "c"], k=2)
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert r["top1"] == pytest.approx(4 / 6)
    assert r["top2"] == pytest.approx(6 / 6)
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert (b["precision"], b["recall"]) == pytest.approx((1 / 2, 1 / 2))
    assert c["f1"] == 1.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_absent_class_does_not_enter_macro_average():
    r = classification_report(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    assert math.isnan(r["per_class"]["b"]["recall"])
    assert r["macro_f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_calibration_of_a_perfectly_and_a_badly_calibrated_model():
    from animl_retrain.modeling.metrics import calibration

    # 10 crops at confidence 0.8 of which 8 are right: calibrated. ECE 0.
    y = np.zeros(10, dtype=int)
    p = np.tile([0.8, 0.2], (10, 1))
    p[8:] = [0.2, 0.8]  # two predicted wrong at 0.8 confidence
    r = calibration(y, p, bins=10)
    assert r["ece"] == pytest.approx(0.0, abs=1e-9)
    (used,) = [b for b in r["bins"] if b["count"]]
    assert used["count"] == 10 and used["accuracy"] == pytest.approx(0.8) and used["lower"] == pytest.approx(0.8)
    # always 0.99 confident and right half the time: ECE 0.49
    q = np.tile([0.99, 0.01], (10, 1))
    assert calibration(np.array([0, 1] * 5), q, bins=10)["ece"] == pytest.approx(0.49)


def test_threshold_for_precision_picks_the_lowest_qualifying_threshold():
    from animl_retrain.modeling.metrics import threshold_for_precision

    # class 1 predicted for 6 crops; by descending confidence: hit hit hit miss hit miss
    conf = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7]
    truth = [1, 1, 1, 0, 1, 0]
    probs = np.array([[1 - c, c] for c in conf] + [[0.9, 0.1]])  # plus one rodent predicted as class 0
    y = np.array([*truth, 1])
    r = threshold_for_precision(y, probs, 1, 0.8)
    # at 0.8: 4 hits of 5 flagged = 0.8 precision, recall 4/5
    assert r == {
        "threshold": 0.8,
        "precision": pytest.approx(0.8),
        "recall": pytest.approx(0.8),
        "support": 5,
        "flagged": 5,
        "met": True,
    }
    strict = threshold_for_precision(y, probs, 1, 0.95)
    assert strict["threshold"] == 0.9 and strict["recall"] == pytest.approx(3 / 5) and strict["met"]
    impossible = threshold_for_precision(np.array([0, 1]), np.array([[0.1, 0.9], [0.2, 0.8]]), 1, 0.95)
    assert not impossible["met"] and impossible["precision"] == pytest.approx(0.5)
    never = threshold_for_precision(np.array([1]), np.array([[0.9, 0.1]]), 1, 0.95)
    assert never["threshold"] == 1.0 and never["recall"] == 0.0 and not never["met"]


def test_operating_points_count_natives_flagged_as_invasive():
    from animl_retrain.modeling.metrics import operating_points

    labels = ["fox", "rat", "skunk"]
    y = np.array([1, 1, 1, 0, 0, 2, 2])
    probs = np.array(
        [
            [0.0, 0.99, 0.01],
            [0.0, 0.9, 0.1],
            [0.6, 0.4, 0.0],  # a rat missed
            [0.3, 0.7, 0.0],  # a fox called a rat, with low confidence
            [1.0, 0.0, 0.0],
            [0.0, 0.2, 0.8],
            [0.05, 0.95, 0.0],  # a skunk called a rat, confidently
        ]
    )
    ops = operating_points(y, probs, labels, ["rat"], 0.95)
    rat = ops["per_class"]["rat"]
    assert rat["met"] and rat["threshold"] == 0.99 and rat["recall"] == pytest.approx(1 / 3)
    assert ops["native_crops"] == 4 and ops["native_flagged"] == 0 and ops["native_flagged_rate"] == 0.0
    assert ops["native_flagged_rate_top1"] == pytest.approx(2 / 4)
    loose = operating_points(y, probs, labels, ["rat"], 0.5)
    assert loose["per_class"]["rat"]["threshold"] == 0.7 and loose["native_flagged"] == 2
    assert math.isnan(operating_points(y, probs, labels, [], 0.95)["native_flagged_rate"])
