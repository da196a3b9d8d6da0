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
        "floor_binding": False,
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


def test_recall_floor_keeps_recall_and_says_the_precision_target_is_out_of_reach():
    from animl_retrain.modeling.metrics import threshold_for_precision

    conf = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7]
    truth = [1, 1, 1, 0, 1, 0]
    probs = np.array([[1 - c, c] for c in conf] + [[0.9, 0.1]])
    y = np.array([*truth, 1])
    # precision 0.95 is reached only at 0.9 (recall 3/5); a floor of 0.8 forbids that threshold
    floored = threshold_for_precision(y, probs, 1, 0.95, recall_floor=0.8)
    assert floored["threshold"] == 0.8 and floored["recall"] == pytest.approx(0.8)
    assert not floored["met"] and floored["floor_binding"]
    # a floor the target already satisfies changes nothing
    easy = threshold_for_precision(y, probs, 1, 0.95, recall_floor=0.5)
    assert easy["threshold"] == 0.9 and easy["met"] and not easy["floor_binding"]


def test_thresholds_are_chosen_on_val_and_reported_on_test():
    from animl_retrain.modeling.metrics import operating_points

    labels = ["fox", "rat"]
    # on val, rats are predicted with 0.9+ and foxes stay below 0.8: the threshold lands at 0.9
    val_y = np.array([1, 1, 0])
    val_p = np.array([[0.05, 0.95], [0.1, 0.9], [0.3, 0.7]])
    # on test the same threshold misses a rat at 0.85 and flags a fox at 0.92
    test_y = np.array([1, 1, 0, 0])
    test_p = np.array([[0.05, 0.95], [0.15, 0.85], [0.08, 0.92], [0.9, 0.1]])
    ops = operating_points(val_y, val_p, labels, ["rat"], 0.95, held_out=(test_y, test_p))
    rat = ops["per_class"]["rat"]
    assert rat["threshold"] == 0.9 and rat["chosen_on"]["precision"] == 1.0 and rat["chosen_on"]["recall"] == 1.0
    assert rat["precision"] == pytest.approx(0.5) and rat["recall"] == pytest.approx(0.5) and rat["missed"] == 1
    assert ops["chosen_on"] == "val" and ops["native_flagged"] == 1


def test_location_bootstrap_is_wider_than_a_crop_bootstrap_when_mistakes_cluster_by_location():
    from animl_retrain.modeling.metrics import bootstrap, classification_report

    rng = np.random.default_rng(1)
    location = np.repeat(np.arange(20), 30)
    accuracy = np.where(rng.random(20) < 0.5, 0.95, 0.4)[location]  # some cameras are easy, others hard
    y = rng.integers(0, 3, 600)
    probs = np.eye(3)[np.where(rng.random(600) < accuracy, y, rng.integers(0, 3, 600))]
    macro = classification_report(y, probs, ["a", "b", "c"])["macro_f1"]
    by_location = bootstrap(location, y, probs)
    by_crop = bootstrap(np.arange(600), y, probs)
    for ci in (by_location, by_crop):
        assert ci["macro_f1"][0] < macro < ci["macro_f1"][1]
    width = {k: ci["macro_f1"][1] - ci["macro_f1"][0] for k, ci in (("loc", by_location), ("crop", by_crop))}
    assert width["loc"] > 1.5 * width["crop"]
    assert bootstrap(location, y, probs) == by_location  # deterministic per seed
    assert by_location["groups"] == 20 and by_location["unit"] == "location"


def test_paired_bootstrap_tells_a_real_gain_from_a_tie():
    from animl_retrain.modeling.metrics import bootstrap

    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 800)
    groups = np.arange(800) % 40
    good = np.eye(4)[np.where(rng.random(800) < 0.8, y, rng.integers(0, 4, 800))]
    worse = np.eye(4)[np.where(rng.random(800) < 0.5, y, rng.integers(0, 4, 800))]
    other = np.eye(4)[np.where(rng.random(800) < 0.8, y, rng.integers(0, 4, 800))]  # as good, other mistakes
    gain = bootstrap(groups, y, good, worse)["difference"]["macro_f1"]
    assert gain[0] > 0
    tie = bootstrap(groups, y, good, other)["difference"]["macro_f1"]
    assert tie[0] < 0 < tie[1]
