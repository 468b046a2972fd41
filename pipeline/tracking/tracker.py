"""MLflow runs of a training: one parent run per training, one nested run per stage.

Every call names its run by id (MlflowClient), never through MLflow's process-global "active run", because
with Airflow the parent is created in one task and each stage runs in another process. A retried stage
task finds its stage run again (tag `cmaclip.stage` under the parent) and continues it, so a training
always has exactly one run per stage, whose epoch metrics continue where the failed attempt stopped.

Parent run: params = the config flattened (`config.*`), the dataset (`dataset.*`: URI, fingerprints, rows
per split), the code version and package versions; artifacts = config.json, labels.json.
Stage run: per-epoch metrics (step = epoch): `train/loss`, `train/loss/<task>`, `val/<task>/{accuracy,
macro_f1,recall_at_precision,threshold,image_weight}`, `val/mean_*`, `val/loss`, `lr/<group>`; throttled
step metrics `step/*`; MLflow system metrics; artifacts = the best checkpoint, config.json, labels.json,
thresholds.json, plots/<task>/{precision_recall,confusion,lambda}.png, best_metrics.json. The align stage
run logs `val/image_to_title_recall_at_{1,5}`, `val/loss` (contrastive), `val/logit_scale`, `val/n` instead
of the per-task metrics, and no plots.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import platform
import subprocess
import time
from collections import defaultdict
from typing import Any, Iterator, Mapping

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from cmaclip.config import CMACLIPConfig
from cmaclip.corruption import names_label
from cmaclip.evaluate import Predictions
from cmaclip.train import Callback, StageResult

from .. import settings
from . import plots

TRAINING_EXPERIMENT = "cmaclip-training"
STAGE_TAG, KIND_TAG, PARENT_TAG = "cmaclip.stage", "cmaclip.kind", "mlflow.parentRunId"
PACKAGES = ("torch", "open_clip_torch", "mlflow", "numpy", "pyarrow")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


# --- what identifies a training ----------------------------------------------------------------------

def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the checkout (with `-dirty` if the tree has changes), else the package version.
    Installed from a wheel there is no checkout: a git repo around site-packages is not this code's."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=settings.REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    if settings.REPO_ROOT is not None:
        try:
            commit = git("rev-parse", "HEAD")
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
            return commit + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    import cmaclip
    return f"cmaclip-{cmaclip.__version__}"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def package_versions() -> dict[str, str]:
    versions = {name: importlib.metadata.version(name) for name in PACKAGES if _installed(name)}
    return {"python": platform.python_version(), **versions}


def dataset_fingerprint(manifest: Mapping[str, Any]) -> str:
    """Hash of the manifest without its `run` block (timings), i.e. of what the dataset holds and how it
    was made: two identical ingests get the same fingerprint."""
    content = {k: v for k, v in manifest.items() if k != "run"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_params(config: CMACLIPConfig, dataset_uri: str, manifest: Mapping[str, Any]) -> dict[str, str]:
    """`manifest`: the dataset's, as JSON (`pipeline.manifests.DatasetManifest.to_dict()`)."""
    params = {f"config.{k}": v for k, v in flatten(config.to_dict()).items()}
    params.update({
        "dataset.uri": dataset_uri,
        "dataset.fingerprint": dataset_fingerprint(manifest),
        "dataset.input_fingerprint": manifest["input"]["fingerprint"],
        **{f"dataset.rows.{s}": n for s, n in manifest["counts"]["rows_by_split"].items()},
        "code.version": code_version(),
        **{f"versions.{k}": v for k, v in package_versions().items()},
    })
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_LENGTH]


# --- search filters ----------------------------------------------------------------------------------

def search_filter(equals: Mapping[str, str]) -> str:
    """An MLflow search filter: `key = value` for each item, joined by `and`.

    MLflow's filter grammar has no escape character: a string literal is whatever lies between two single
    or two double quotes. So a value is quoted with the kind it does not contain. A value holding both
    kinds cannot be written as a literal; it becomes `key LIKE pattern`, with each single quote and each
    backslash (PostgreSQL's LIKE escape) as the one-character wildcard `_`. That matches the value and
    possibly others: callers that may meet such values compare the results with the value."""
    return " and ".join(_condition(key, str(value)) for key, value in equals.items())


def _condition(key: str, value: str) -> str:
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    pattern = value.replace("\\", "_").replace("'", "_")
    return f"{key} LIKE '{pattern}'"


# --- runs --------------------------------------------------------------------------------------------

def client() -> MlflowClient:
    """A client on the configured store (see pipeline.settings)."""
    uri = settings.configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MlflowClient.log_batch splits what it is given into calls within the store's per-request limits.

def log_params(c: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    c.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Finite numbers only: an abstaining threshold is +inf, which no metric store keeps faithfully."""
    now = _now_ms()
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if _loggable(v)])


def _loggable(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def _now_ms() -> int:
    return int(time.time() * 1000)


def start_training_run(config: CMACLIPConfig, dataset_uri: str, manifest: Mapping[str, Any], *,
                       experiment: str = TRAINING_EXPERIMENT, run_name: str | None = None,
                       tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run (status RUNNING until `end_run`) with its params; returns its id."""
    c = client()
    run = c.create_run(settings.experiment_id(experiment), run_name=run_name,
                       tags={KIND_TAG: "training", "mlflow.source.name": "pipeline.training", **(tags or {})})
    run_id = run.info.run_id
    log_params(c, run_id, training_params(config, dataset_uri, manifest))
    c.log_dict(run_id, config.to_dict(), "config.json")
    c.log_dict(run_id, manifest["vocabularies"], "labels.json")
    return run_id


def stage_run(parent_run_id: str, stage: str) -> str:
    """The stage's nested run under the parent: the existing one (a retried stage), else a new one."""
    c = client()
    parent = c.get_run(parent_run_id)
    found = c.search_runs([parent.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                          filter_string=search_filter({f"tags.`{PARENT_TAG}`": parent_run_id,
                                                       f"tags.`{STAGE_TAG}`": stage}))
    if found:
        return found[0].info.run_id
    run = c.create_run(parent.info.experiment_id, run_name=stage,
                       tags={PARENT_TAG: parent_run_id, STAGE_TAG: stage, KIND_TAG: "stage"})
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def system_metrics_available() -> bool:
    """MLflow samples CPU/memory/disk with psutil (GPU with pynvml); without psutil it cannot."""
    return _installed("psutil")


# --- the training callback ---------------------------------------------------------------------------

class MLflowCallback(Callback):
    """Logs a stage's metrics into its run: per epoch (step = epoch) everything in the epoch entry plus the
    per-task training loss averaged over the epoch's optimizer steps; every `step_every` optimizer steps the
    step metrics under `step/`."""

    def __init__(self, run_id: str, step_every: int = 10):
        self.run_id, self.step_every = run_id, step_every
        self.client = client()
        self._task_loss: dict[str, list[float]] = defaultdict(list)

    def on_stage_start(self, stage: str, info: dict[str, Any]) -> None:
        # Only what is fixed for the stage: a resumed attempt logs the same values again, which MLflow allows.
        fixed = {"stage": stage, "frozen": info["frozen"], "precision": info["precision"],
                 "accumulation": info["accumulation"], "world_size": info["world_size"],
                 "trainable_parameters": info["trainable_parameters"], "epochs": info["epochs"],
                 **{f"lr.{g}": lr for g, lr in info["lr"].items()}}
        log_params(self.client, self.run_id, {f"stage.{k}": _param_value(v) for k, v in fixed.items()})
        self.client.set_tag(self.run_id, "cmaclip.start_epoch", str(info["start_epoch"]))
        self._task_loss.clear()

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key.startswith("loss/"):
                self._task_loss[key.removeprefix("loss/")].append(float(value))
        if self.step_every and step % self.step_every == 0:
            log_metrics(self.client, self.run_id, {f"step/{k}": v for k, v in metrics.items()}, step)

    def on_epoch_end(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "epoch" and _loggable(v)}
        values.update({f"train/loss/{t}": float(np.mean(v)) for t, v in self._task_loss.items() if v})
        log_metrics(self.client, self.run_id, values, epoch)
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

    c = client()
    ckpt = read_checkpoint_meta(result.best_checkpoint)
    c.log_artifacts(run_id, str(result.best_checkpoint), "checkpoint")
    c.log_dict(run_id, ckpt.config.to_dict(), "config.json")
    c.log_dict(run_id, ckpt.labels, "labels.json")
    c.log_dict(run_id, {t: (v if math.isfinite(v) else "inf") for t, v in ckpt.thresholds.items()},
               "thresholds.json")
    c.log_dict(run_id, {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                        "metrics": result.best_metrics}, "best_metrics.json")
    log_metrics(c, run_id, {f"best/{k}": v for k, v in result.best_metrics.items()}, result.best_epoch)
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
