import math

import numpy as np
import pytest

from animl_retrain.metrics import classification_report


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
