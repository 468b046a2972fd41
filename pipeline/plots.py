"""Per-task diagnostic plots logged with each stage: precision-recall, confusion, and the modality weight.

Inputs are plain arrays, so the plots can be drawn from any evaluation. The Agg backend renders without a
display (Airflow workers, CI).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def precision_recall(correct: np.ndarray, confidence: np.ndarray, target_precision: float, task: str):
    """Precision and recall of the top-1 prediction as the confidence threshold sweeps down, with the
    target precision and the loosest threshold that still reaches it (cmaclip.metrics' definition)."""
    correct, confidence = np.asarray(correct, bool), np.asarray(confidence, float)
    fig, ax = plt.subplots(figsize=(5, 4))
    if correct.size:
        order = np.argsort(-confidence, kind="stable")
        hits = np.cumsum(correct[order])
        kept = np.arange(1, correct.size + 1)
        precision, recall = hits / kept, hits / correct.size
        ax.plot(recall, precision, lw=1.5)
        ok = np.flatnonzero(precision >= target_precision)
        if ok.size:
            i = ok[-1]
            ax.scatter([recall[i]], [precision[i]], color="C3", zorder=3,
                       label=f"threshold {confidence[order][i]:.3f}: recall {recall[i]:.3f}")
            ax.legend(loc="lower left", fontsize=8)
    ax.axhline(target_precision, color="grey", ls="--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{task}: precision-recall (n={correct.size})")
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], task: str, top_k: int = 10):
    """Confusion matrix over the `top_k` most frequent true classes; other classes are pooled as 'other'
    so every row still sums to the class count."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    counts = np.bincount(y_true, minlength=len(class_names)) if y_true.size else np.zeros(len(class_names), int)
    top = [c for c in np.argsort(-counts, kind="stable")[:top_k] if counts[c] > 0]
    index = {c: i for i, c in enumerate(top)}
    other = len(top)
    size = other + 1 if len(top) < len(class_names) else other
    matrix = np.zeros((max(size, 1), max(size, 1)), int)
    for t, p in zip(y_true, y_pred):
        if t in index:
            matrix[index[t], index.get(p, other if size > other else index[t])] += 1
    names = [class_names[c] for c in top] + (["other"] if size > other else [])
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(names), 1.0 + 0.5 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{task}: confusion (top {len(top)} classes)")
    fig.tight_layout()
    return fig


def lambda_histogram(image_weight: np.ndarray, title_mentions_label: np.ndarray, task: str):
    """Histogram of the image weight λ, split by whether the title names the true label. The paper's
    point: when the title says the answer the model should lean on text (low λ), otherwise on the image."""
    lam, mentioned = np.asarray(image_weight, float), np.asarray(title_mentions_label, bool)
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(0, 1, 26)
    for mask, name in ((mentioned, "title names the label"), (~mentioned, "title does not")):
        if mask.any():
            ax.hist(lam[mask], bins=bins, alpha=0.6, label=f"{name} (n={mask.sum()}, mean {lam[mask].mean():.2f})")
    ax.set(xlim=(0, 1), xlabel="image weight λ", ylabel="products", title=f"{task}: modality weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def title_mentions(titles: Sequence[str | None], labels: Sequence[str | None]) -> np.ndarray:
    """True where the title contains the label as a whole word (case-insensitive)."""
    out = np.zeros(len(titles), bool)
    for i, (title, label) in enumerate(zip(titles, labels)):
        if title and label:
            out[i] = re.search(rf"\b{re.escape(str(label))}\b", str(title), re.IGNORECASE) is not None
    return out


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
