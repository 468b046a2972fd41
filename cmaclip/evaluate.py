"""Run a model over batches: class probabilities, labels and the modality weight lambda per task; metrics.

Used by training (validation after each epoch), by the registry (champion vs challenger on one test split)
and by the paper benchmark. A batch is the data layer's dict:

    {"product_id": list[str], "images": [B, 3, H, W] float, "text": [B, L] long,
     "labels": {task: [B] long, -1 = missing}}      # "labels" may be absent when only scoring
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from .metrics import precision_at_threshold, summarize, task_metrics
from .model import CMACLIP
from .precision import autocast, resolve_precision
from .transforms import trim_tokens


# ---------------------------------------------------------------------------------------------------------
# Predictions.

@dataclass
class Predictions:
    product_id: list[str]
    probs: dict[str, np.ndarray]                                       # task -> [N, C] float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)        # task -> [N] int64, -1 = missing
    image_weight: dict[str, np.ndarray] = field(default_factory=dict)  # task -> [N] float32, lambda

    def __len__(self) -> int:
        return len(self.product_id)

    @property
    def tasks(self) -> list[str]:
        return list(self.probs)

    def take(self, index: np.ndarray) -> "Predictions":
        pick = lambda d: {t: v[index] for t, v in d.items()}  # noqa: E731
        return Predictions([self.product_id[i] for i in index], pick(self.probs), pick(self.labels),
                           pick(self.image_weight))

    def unique(self) -> "Predictions":
        """First occurrence of each product id: a distributed sampler pads shards with repeated samples."""
        _, first = np.unique(np.asarray(self.product_id, dtype=object).astype(str), return_index=True)
        return self.take(np.sort(first))

    @staticmethod
    def concat(parts: Sequence["Predictions"]) -> "Predictions":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Predictions([], {})
        cat = lambda attr: {t: np.concatenate([getattr(p, attr)[t] for p in parts])  # noqa: E731
                            for t in getattr(parts[0], attr)}
        return Predictions([i for p in parts for i in p.product_id], cat("probs"), cat("labels"),
                           cat("image_weight"))


def _batch_labels(batch: dict, task: str, n: int) -> np.ndarray | None:
    labels = batch.get("labels")
    if labels is None:
        return None
    if task not in labels:
        return np.full(n, -1, dtype=np.int64)
    return np.asarray(labels[task].cpu(), dtype=np.int64)


def _restore_modes(model: torch.nn.Module):
    modes = [(m, m.training) for m in model.modules()]

    def restore():
        for m, training in modes:
            m.training = training
    return restore


def predict(model: CMACLIP, batches: Iterable[dict], *, device: str | torch.device = "cpu",
            precision: str = "fp32", progress: bool = False) -> Predictions:
    """Probabilities, labels (when batches have them) and lambda for every sample, in batch order.

    Runs in eval mode under inference_mode; each module's train/eval mode is restored afterwards, so the
    training loop can validate between epochs without losing which modules its stage froze."""
    precision = resolve_precision(precision, device)
    restore = _restore_modes(model)
    model.eval()
    ids: list[str] = []
    probs, labels, weights = ({t: [] for t in model.tasks} for _ in range(3))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="predict", leave=False)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for batch in batches:
                out = model(batch["images"].to(device), trim_tokens(batch["text"]).to(device))
                ids.extend(str(i) for i in batch["product_id"])
                for task in model.tasks:
                    probs[task].append(torch.softmax(out.logits[task].float(), dim=-1).cpu().numpy())
                    weights[task].append(out.image_weight[task].float().cpu().numpy())
                    y = _batch_labels(batch, task, len(batch["product_id"]))
                    if y is not None:
                        labels[task].append(y)
    finally:
        restore()
    cat = lambda d: {t: np.concatenate(v) for t, v in d.items() if v}  # noqa: E731
    return Predictions(ids, cat(probs), cat(labels), cat(weights))


# ---------------------------------------------------------------------------------------------------------
# Metrics.

def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy over labelled samples, the same quantity `losses.multitask_loss` trains."""
    keep = labels >= 0
    if not keep.any():
        return 0.0
    p = probs[keep, labels[keep]].astype(np.float64)
    return float(-np.log(np.maximum(p, np.finfo(np.float32).tiny)).mean())


def metrics_from_predictions(preds: Predictions, target_precision: float = 0.9) -> dict[str, float]:
    """Flat metrics: `<task>/{n,accuracy,macro_f1,recall_at_precision,threshold,image_weight}`, the means
    over tasks (`mean_accuracy`, `mean_recall_at_precision`, `mean_macro_f1`), `loss` (summed over tasks
    like the training loss) and `n` (samples). Tasks without labels get only their image weight."""
    labelled = [t for t in preds.tasks if t in preds.labels]
    per_task = {t: task_metrics(preds.probs[t], preds.labels[t], target_precision) for t in labelled}
    flat = summarize(per_task)
    for task in preds.tasks:
        w = preds.image_weight.get(task)
        flat[f"{task}/image_weight"] = float(w.mean()) if w is not None and w.size else float("nan")
    if labelled:
        flat["loss"] = float(sum(_nll(preds.probs[t], preds.labels[t]) for t in labelled))
    flat["n"] = len(preds)
    return flat


def precision_at_thresholds(preds: Predictions, thresholds: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per labelled task with a threshold (a checkpoint's, calibrated on validation): the threshold, the
    precision reached at it on these predictions and the coverage (metrics.precision_at_threshold)."""
    return {t: precision_at_threshold(preds.probs[t], preds.labels[t], thresholds[t])
            for t in preds.tasks if t in preds.labels and t in thresholds}


def thresholds_from_metrics(metrics: dict[str, float], tasks: Iterable[str]) -> dict[str, float]:
    """Per-task confidence thresholds calibrated at the target precision (inf = always abstain)."""
    return {t: float(metrics[f"{t}/threshold"]) for t in tasks if f"{t}/threshold" in metrics}


def evaluate(model: CMACLIP, batches: Iterable[dict], target_precision: float = 0.9, *,
             device: str | torch.device = "cpu", precision: str = "fp32",
             progress: bool = False) -> tuple[dict[str, float], Predictions]:
    """(flat metrics, predictions) of a model over labelled batches."""
    preds = predict(model, batches, device=device, precision=precision, progress=progress)
    return metrics_from_predictions(preds, target_precision), preds
