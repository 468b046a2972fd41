"""MLflow runs of a training: one parent run per training, one nested run per stage.

Every call names its run by id (MlflowClient), never through MLflow's process-global "active run", because
with Airflow the parent is created in one task and each stage runs in another process. A retried stage
task finds its stage run again (tag `cmaclip.stage` under the parent) and continues it, so a training
always has exactly one run per stage, whose epoch metrics continue where the failed attempt stopped.

Parent run, named `<verb> <UTC date time>` (`retrain 2026-12-01 11:34`), then ` → v<n>` once registered:
params = the config flattened (`config.*`), the dataset (`dataset.*`: URI, fingerprints, rows per split),
the code version and package versions; the dataset as an MLflow input (its URI, digest = its fingerprint);
the learning curve over every stage, epochs counted across stages (`all_stages/*`, and the figure
`learning_curve.png`); artifacts = config.json, labels.json.
Stage run, named after its stage: per-epoch metrics (step = epoch): `train/loss`, `train/loss/<task>`,
`val/<task>/{accuracy,macro_f1,recall_at_precision,threshold,image_weight}`, `val/mean_*`, `val/loss`,
`lr/<group>`; throttled step metrics `step/*`; MLflow system metrics; artifacts = the best checkpoint,
config.json, labels.json, thresholds.json, plots/<task>/{precision_recall,confusion,lambda}.png,
best_metrics.json. The align stage run logs `val/image_to_title_recall_at_{1,5}`, `val/loss` (contrastive),
`val/logit_scale`, `val/n` instead of the per-task metrics, and no plots. What a stage logs is
`stage_logging`'s; this module stays free of torch, so the registry commands start quickly.

Every experiment cmaclip creates is tagged as model training (`pipeline.settings.experiment_id`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import platform
import re
import subprocess
import time
from typing import Any, Mapping, Sequence

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from cmaclip.config import CMACLIPConfig

from .. import settings

TRAINING_EXPERIMENT = "cmaclip-training"
STAGE_TAG, KIND_TAG, PARENT_TAG = "cmaclip.stage", "cmaclip.kind", "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# The Airflow run that made a training (set by pipeline.orchestration; the registry links to it).
AIRFLOW_DAG_TAG, AIRFLOW_RUN_TAG = "airflow.dag_id", "airflow.run_id"
# The per-epoch metrics the parent run also gets, with the epoch counted across stages.
CURVE_METRICS = ("train/loss", "val/loss", "val/mean_accuracy", "val/mean_recall_at_precision")
CURVE_PREFIX = "all_stages/"
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
    return {k: param_value(v) for k, v in params.items()}


def param_value(value: Any) -> str:
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
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if loggable(v)])


def loggable(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def _now_ms() -> int:
    return int(time.time() * 1000)


def timestamped_name(verb: str) -> str:
    """`retrain 2026-12-01 11:34` (UTC): a run name a person can tell apart in a list."""
    return f"{verb} {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"


def start_training_run(config: CMACLIPConfig, dataset_uri: str, manifest: Mapping[str, Any], *,
                       experiment: str = TRAINING_EXPERIMENT, run_name: str | None = None,
                       tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run (status RUNNING until `end_run`) with its params and its dataset input;
    returns its id. `run_name` defaults to `train <date time>`."""
    c = client()
    run = c.create_run(settings.experiment_id(experiment), run_name=run_name or timestamped_name("train"),
                       tags={KIND_TAG: "training", "mlflow.source.name": "pipeline.training", **(tags or {})})
    run_id = run.info.run_id
    log_params(c, run_id, training_params(config, dataset_uri, manifest))
    log_dataset_input(c, run_id, dataset_uri, dataset_fingerprint(manifest), manifest["counts"]["rows_by_split"])
    c.log_dict(run_id, config.to_dict(), "config.json")
    c.log_dict(run_id, manifest["vocabularies"], "labels.json")
    return run_id


def log_dataset_input(c: MlflowClient, run_id: str, dataset_uri: str, fingerprint: str,
                      rows_by_split: Mapping[str, int], context: str = "training") -> None:
    """The dataset as the run's MLflow input, described, not read: its URI as the source, its fingerprint
    as the digest (the same dataset logged twice is one dataset), its rows per split as the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = dataset_uri.split("://", 1)[0] if "://" in dataset_uri else "local"
    dataset = Dataset(name=dataset_uri.rstrip("/").rsplit("/", 1)[-1] or dataset_uri, digest=fingerprint,
                      source_type="local" if scheme == "file" else scheme,
                      source=json.dumps({"uri": dataset_uri}),
                      profile=json.dumps({"rows_by_split": dict(rows_by_split)}))
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def name_registered(c: MlflowClient, run_id: str, version: str) -> str:
    """Append ` → v<version>` to a training run's name (replacing an earlier such suffix); returns the
    name. Only the parent runs cmaclip made are renamed: another run keeps the name it was given."""
    run = c.get_run(run_id)
    name = run.info.run_name or ""
    if run.data.tags.get(KIND_TAG) == "training":
        name = f"{re.sub(r' → v[0-9]+$', '', name)} → v{version}".strip()
        c.update_run(run_id, name=name)
    return name


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




# --- the learning curve across stages ----------------------------------------------------------------

def log_curve_point(c: MlflowClient, parent_run_id: str, values: Mapping[str, float], epoch: int) -> None:
    """One epoch of a stage on the parent run's curve: `all_stages/<metric>` at the epoch counted across
    stages (the stage's first epoch in the training + its own epoch)."""
    log_metrics(c, parent_run_id, {CURVE_PREFIX + k: values[k] for k in CURVE_METRICS if k in values}, epoch)


def log_learning_curve(c: MlflowClient, run_id: str, stages: Sequence[tuple[str, int, int]]) -> bool:
    """The parent's `learning_curve.png`: its `all_stages/*` histories, every stage's span marked.
    `stages`: (stage, first epoch in the training, epochs run). False when there is nothing to draw."""
    from . import plots

    series = {}
    for key in CURVE_METRICS:
        # A retried epoch is logged again: its latest value stands.
        history = sorted(c.get_metric_history(run_id, CURVE_PREFIX + key), key=lambda m: m.timestamp)
        if history:
            series[key] = sorted({m.step: m.value for m in history}.items())
    if not series:
        return False
    fig = plots.learning_curve(series, stages)
    try:
        c.log_figure(run_id, fig, "learning_curve.png", save_kwargs={"dpi": 100})
    finally:
        plots.close(fig)
    return True
