"""The plots logged with a training: per task and stage, precision-recall, confusion and the modality
weight; per training, the learning curve across its stages.

Inputs are plain arrays, so the plots can be drawn from any evaluation. The Agg backend renders without a
display (Airflow workers, CI).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from cmaclip.metrics import recall_at_precision  # noqa: E402


def precision_recall(correct: np.ndarray, confidence: np.ndarray, target_precision: float, task: str):
    """Precision and recall of the top-1 prediction as the confidence threshold sweeps down, with the
    target precision and the operating point cmaclip.metrics calibrates (the loosest threshold reaching it)."""
    correct, confidence = np.asarray(correct, bool), np.asarray(confidence, float)
    fig, ax = plt.subplots(figsize=(5, 4))
    if correct.size:
        order = np.argsort(-confidence, kind="stable")
        hits = np.cumsum(correct[order])
        kept = np.arange(1, correct.size + 1)
        ax.plot(hits / correct.size, hits / kept, lw=1.5)
        recall, threshold = recall_at_precision(correct, confidence, target_precision)
        if np.isfinite(threshold):
            precision = correct[confidence >= threshold].mean()
            ax.scatter([recall], [precision], color="C3", zorder=3,
                       label=f"threshold {threshold:.3f}: recall {recall:.3f}")
            ax.legend(loc="lower left", fontsize=8)
    ax.axhline(target_precision, color="grey", ls="--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{task}: precision-recall (n={correct.size})")
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], task: str, top_k: int = 10):
    """Confusion matrix: rows are the `top_k` most frequent true classes, columns the same classes plus
    'other' (predictions outside them), so each row sums to its class count."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    counts = np.bincount(y_true, minlength=len(class_names))
    top = [int(c) for c in np.argsort(-counts, kind="stable")[:top_k] if counts[c] > 0]
    column = {c: i for i, c in enumerate(top)}
    matrix = np.zeros((len(top), len(top) + 1), int)
    for t, p in zip(y_true, y_pred):
        if t in column:
            matrix[column[t], column.get(p, len(top))] += 1
    if not matrix[:, -1].any():
        matrix = matrix[:, :-1]
    rows = [class_names[c] for c in top]
    cols = rows + ["other"] * (matrix.shape[1] > len(top))
    fig, ax = plt.subplots(figsize=(2 + 0.45 * len(cols), 1.5 + 0.45 * len(rows)))
    ax.imshow(matrix if matrix.size else np.zeros((1, 1)), cmap="Blues", aspect="auto")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{task}: confusion (top {len(top)} classes)")
    fig.tight_layout()
    return fig


def lambda_histogram(image_weight: np.ndarray, title_mentions_label: np.ndarray, task: str):
    """Histogram of the image weight λ, split by whether the title names the true label (see
    `cmaclip.corruption.names_label`). The paper's point: when the title says the answer the model can lean
    on text (low λ); when it does not, on the image."""
    lam, mentioned = np.asarray(image_weight, float), np.asarray(title_mentions_label, bool)
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(0, 1, 26)
    for mask, name in ((mentioned, "title names the label"), (~mentioned, "title does not")):
        if mask.any():
            ax.hist(lam[mask], bins=bins, alpha=0.6, label=f"{name} (n={mask.sum()}, mean {lam[mask].mean():.2f})")
    ax.set(xlim=(0, 1), xlabel="image weight λ", ylabel="products", title=f"{task}: modality weight")
    if lam.size:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    """Free a figure once it is logged: pyplot keeps every open figure alive."""
    plt.close(fig)


def learning_curve(series: Mapping[str, Sequence[tuple[int, float]]], stages: Sequence[tuple[str, int, int]]):
    """A training's curves over its epochs counted across stages: losses on the left, validation metrics on
    the right, each stage's span shaded and named. `series`: metric -> [(epoch, value)]; `stages`: (stage,
    first epoch, epochs run)."""
    groups = [[k for k in series if k.endswith("loss")], [k for k in series if not k.endswith("loss")]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.4), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for i, (stage, first, count) in enumerate(stages):
            ax.axvspan(first - 0.5, first + max(count, 1) - 0.5, color="grey", alpha=0.14 if i % 2 else 0.05, lw=0)
            ax.text(first - 0.4, 0.98, stage, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o", ms=3, lw=1.5, label=key)
        ax.set(xlabel="epoch (all stages)", title="loss" if keys[0].endswith("loss") else "validation")
        ax.margins(y=0.15)  # room for the stage names above the curves
        # Below the axes, where it hides neither a curve nor a stage name.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig
