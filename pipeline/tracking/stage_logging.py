"""What a training stage logs into its MLflow run: the epoch callback (which also extends the training's
cross-stage learning curve on the parent run), and the stage's artifacts and diagnostic plots.

Apart from `tracker` because it needs torch (cmaclip.train's callback, cmaclip.evaluate's predictions):
the registry and the CLI's `registry` commands import `tracker` only, and stay quick to start.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterator, Mapping

import numpy as np
from mlflow import MlflowClient

from cmaclip.corruption import names_label
from cmaclip.evaluate import Predictions
from cmaclip.train import Callback, StageResult

from . import plots, tracker


class MLflowCallback(Callback):
    """Logs a stage's metrics into its run: per epoch (step = epoch) everything in the epoch entry plus the
    per-task training loss averaged over the epoch's optimizer steps; every `step_every` optimizer steps the
    step metrics under `step/`. With `parent_run_id`, the epoch's curve metrics also go to the parent run
    at step `first_epoch + epoch`, so one curve there spans every stage (`tracker.log_curve_point`)."""

    def __init__(self, run_id: str, step_every: int = 10, parent_run_id: str | None = None, first_epoch: int = 0):
        self.run_id, self.step_every = run_id, step_every
        self.parent_run_id, self.first_epoch = parent_run_id, first_epoch
        self.client = tracker.client()
        self._task_loss: dict[str, list[float]] = defaultdict(list)

    def on_stage_start(self, stage: str, info: dict[str, Any]) -> None:
        # Only what is fixed for the stage: a resumed attempt logs the same values again, which MLflow allows.
        fixed = {"stage": stage, "frozen": info["frozen"], "precision": info["precision"],
                 "accumulation": info["accumulation"], "world_size": info["world_size"],
                 "trainable_parameters": info["trainable_parameters"], "epochs": info["epochs"],
                 "first_epoch_of_training": self.first_epoch, **{f"lr.{g}": lr for g, lr in info["lr"].items()}}
        tracker.log_params(self.client, self.run_id, {f"stage.{k}": tracker.param_value(v) for k, v in fixed.items()})
        self.client.set_tag(self.run_id, "cmaclip.start_epoch", str(info["start_epoch"]))
        self._task_loss.clear()

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key.startswith("loss/"):
                self._task_loss[key.removeprefix("loss/")].append(float(value))
        if self.step_every and step % self.step_every == 0:
            tracker.log_metrics(self.client, self.run_id, {f"step/{k}": v for k, v in metrics.items()}, step)

    def on_epoch_end(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "epoch" and tracker.loggable(v)}
        values.update({f"train/loss/{t}": float(np.mean(v)) for t, v in self._task_loss.items() if v})
        tracker.log_metrics(self.client, self.run_id, values, epoch)
        if self.parent_run_id:
            tracker.log_curve_point(self.client, self.parent_run_id, values, self.first_epoch + epoch)
        self._task_loss.clear()

    def on_stage_end(self, stage: str, result: StageResult) -> None:
        self.client.set_tag(self.run_id, "cmaclip.best_epoch", str(result.best_epoch))
# --- stage artifacts ---------------------------------------------------------------------------------

def log_stage_artifacts(run_id: str, result: StageResult, predictions: Predictions | None,
                        titles: Mapping[str, str | None], labels: Mapping[str, list[str]],
                        target_precision: float) -> None:
    """The stage's outputs: best checkpoint, its config, vocabularies, thresholds and metrics, and the
    per-task plots of the best checkpoint's `predictions` on the validation split (none without them: the
    align stage trains no classifier). Idempotent (same artifact paths)."""
    from cmaclip.checkpoint import read_checkpoint_meta

    c = tracker.client()
    ckpt = read_checkpoint_meta(result.best_checkpoint)
    c.log_artifacts(run_id, str(result.best_checkpoint), "checkpoint")
    c.log_dict(run_id, ckpt.config.to_dict(), "config.json")
    c.log_dict(run_id, ckpt.labels, "labels.json")
    c.log_dict(run_id, {t: (v if math.isfinite(v) else "inf") for t, v in ckpt.thresholds.items()},
               "thresholds.json")
    c.log_dict(run_id, {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                        "metrics": result.best_metrics}, "best_metrics.json")
    tracker.log_metrics(c, run_id, {f"best/{k}": v for k, v in result.best_metrics.items()}, result.best_epoch)
    if predictions is not None:
        log_plots(c, run_id, predictions, titles, labels, target_precision)


def log_plots(c: MlflowClient, run_id: str, predictions: Predictions, titles: Mapping[str, str | None],
              labels: Mapping[str, list[str]], target_precision: float) -> None:
    for path, fig in stage_plots(predictions, titles, labels, target_precision):
        try:
            c.log_figure(run_id, fig, path, save_kwargs={"dpi": 100})
        finally:
            plots.close(fig)


def stage_plots(predictions: Predictions, titles: Mapping[str, str | None], labels: Mapping[str, list[str]],
                target_precision: float) -> Iterator[tuple[str, Any]]:
    """(plots/<task>/{precision_recall,confusion,lambda}.png, figure) for every task with labelled samples,
    one figure at a time."""
    title_list = [titles.get(pid) for pid in predictions.product_id]
    for task in predictions.tasks:
        y = predictions.labels.get(task)
        if y is None or not (y >= 0).any():
            continue
        keep = y >= 0
        probs, y = predictions.probs[task][keep], y[keep]
        pred, conf = probs.argmax(axis=1), probs.max(axis=1)
        names = np.asarray(labels[task], dtype=object)
        mentioned = names_label([t for t, k in zip(title_list, keep) if k], list(names[y]))
        lam = predictions.image_weight[task][keep]
        yield f"plots/{task}/precision_recall.png", plots.precision_recall(pred == y, conf, target_precision, task)
        yield f"plots/{task}/confusion.png", plots.confusion(y, pred, list(names), task)
        yield f"plots/{task}/lambda.png", plots.lambda_histogram(lam, mentioned, task)
