"""Recall at precision against a brute-force reference, and the other per-task metrics."""
import numpy as np
import pytest

from cmaclip.metrics import NO_THRESHOLD, macro_f1, precision_at_threshold, recall_at_precision, task_metrics


def brute_force(correct, confidence, precision):
    """Try every threshold; keep the loosest one whose kept set reaches the precision."""
    best = (0.0, NO_THRESHOLD)
    for t in sorted(set(confidence.tolist()), reverse=True):
        kept = confidence >= t
        if correct[kept].mean() >= precision:
            best = (correct[kept].sum() / correct.size, t)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_recall_at_precision_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Coarse confidences force ties, which is where a sloppy implementation goes wrong.
    confidence = rng.integers(0, 8, size=n) / 8
    correct = rng.random(n) < rng.uniform(0.3, 1.0)
    for p in (0.5, 0.8, 0.9, 1.0):
        got = recall_at_precision(correct, confidence, p)
        want = brute_force(correct, confidence, p)
        assert got[0] == pytest.approx(want[0]) and got[1] == want[1]


def test_recall_at_precision_edge_cases():
    assert recall_at_precision(np.array([], bool), np.array([]), 0.9) == (0.0, NO_THRESHOLD)
    assert recall_at_precision(np.array([False, False]), np.array([0.9, 0.8]), 0.9) == (0.0, NO_THRESHOLD)
    assert recall_at_precision(np.array([True, True]), np.array([0.9, 0.8]), 0.9) == (1.0, 0.8)


def test_macro_f1_and_accuracy():
    labels = np.array([0, 0, 1, 1, 2, -1])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.05
    m = task_metrics(probs, labels)
    assert m.n == 5 and m.accuracy == pytest.approx(0.8)
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp2 fp1 fn0 -> 0.8; class 2: 1
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert macro_f1(np.array([1]), np.array([1])) == 1.0


def test_precision_at_a_stored_threshold():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0, -1])  # the last is unlabelled: skipped
    got = precision_at_threshold(probs, labels, 0.7)
    assert got["n"] == 4 and got["coverage"] == 0.75  # 0.9, 0.8 and 0.7 kept, 0.6 not
    assert got["precision"] == pytest.approx(2 / 3)   # the 0.8 prediction (class 0) is wrong
    # The threshold calibrated on validation is the one task_metrics returns for it: on the same data,
    # the precision it reaches is at least the target.
    threshold = task_metrics(probs, labels, 0.9).threshold
    assert precision_at_threshold(probs, labels, threshold)["precision"] >= 0.9
    nothing = precision_at_threshold(probs, labels, NO_THRESHOLD)
    assert nothing["coverage"] == 0.0 and np.isnan(nothing["precision"])
    assert precision_at_threshold(probs, np.full(5, -1), 0.5)["n"] == 0
