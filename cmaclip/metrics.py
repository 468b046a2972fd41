"""Per-task metrics: accuracy, macro-F1 and recall at a target precision (the paper's headline metric).

Recall at precision P: rank the top-1 predictions by confidence; keeping those at or above a threshold t,
precision(t) = correct kept / kept and recall(t) = correct kept / all labelled samples. The reported
recall is at the loosest (lowest) threshold whose precision is >= P; the threshold is returned too, so
scoring can abstain below it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

NO_THRESHOLD = float("inf")  # no threshold reaches the target precision: abstain on everything


@dataclass
class TaskMetrics:
    n: int
    accuracy: float
    macro_f1: float
    recall_at_precision: float
    threshold: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def recall_at_precision(correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9):
    """(recall, threshold) for boolean `correct` and float `confidence` of labelled samples."""
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    if correct.size == 0:
        return 0.0, NO_THRESHOLD
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.cumsum(correct[order])
    kept = np.arange(1, conf.size + 1)
    # A threshold keeps every sample tied with it, so only the last position of each tie group counts.
    last_of_group = np.append(conf[1:] != conf[:-1], True)
    ok = last_of_group & (hits >= precision * kept - 1e-12)
    if not ok.any():
        return 0.0, NO_THRESHOLD
    i = np.flatnonzero(ok)[-1]
    return float(hits[i] / correct.size), float(conf[i])


def precision_at_threshold(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """What a threshold fixed beforehand (calibrated on other data) delivers on these samples: `precision`
    of the top-1 predictions kept (confidence >= threshold; NaN when none is kept) and `coverage`, the
    share of labelled samples kept. Unlabelled samples (-1) are skipped, as in `task_metrics`."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    out = {"threshold": float(threshold), "n": int(labels.size), "precision": float("nan"), "coverage": 0.0}
    if labels.size == 0:
        return out
    kept = probs.max(axis=1) >= threshold
    correct = probs.argmax(axis=1) == labels
    out["coverage"] = float(kept.mean())
    if kept.any():
        out["precision"] = float(correct[kept].mean())
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes = np.union1d(y_true, y_pred)
    if classes.size == 0:
        return 0.0
    f1s = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s))


def task_metrics(probs: np.ndarray, labels: np.ndarray, precision: float = 0.9) -> TaskMetrics:
    """Metrics of one task from class probabilities [N, C] and label ids [N] (-1 = unlabelled, skipped)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    if labels.size == 0:
        return TaskMetrics(0, 0.0, 0.0, 0.0, NO_THRESHOLD)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    correct = pred == labels
    recall, threshold = recall_at_precision(correct, conf, precision)
    return TaskMetrics(int(labels.size), float(correct.mean()), macro_f1(labels, pred), recall, threshold)


def summarize(per_task: dict[str, TaskMetrics]) -> dict[str, float]:
    """Flat metric dict: `<task>/<metric>` plus the means over tasks used to pick the best checkpoint."""
    flat: dict[str, float] = {}
    for task, m in per_task.items():
        for key, value in m.as_dict().items():
            flat[f"{task}/{key}"] = value
    if per_task:
        flat["mean_accuracy"] = float(np.mean([m.accuracy for m in per_task.values()]))
        flat["mean_recall_at_precision"] = float(np.mean([m.recall_at_precision for m in per_task.values()]))
        flat["mean_macro_f1"] = float(np.mean([m.macro_f1 for m in per_task.values()]))
    return flat
