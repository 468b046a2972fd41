"""Where a person opens what the registry refers to: MLflow runs and model versions, Airflow DAG runs.
Markdown links when the UI's address is known, else the plain ids (a SQLite store has no UI of its own).

MLflow's UI: `CMACLIP_MLFLOW_UI_URL`, else `MLFLOW_TRACKING_URI` when it is a server (http/https).
Airflow's UI: `AIRFLOW__API__BASE_URL`, Airflow's own setting for the address its links use.
"""
from __future__ import annotations

import os
from urllib.parse import quote

from .. import settings

# MLflow 3.17's UI shows an experiment as GenAI or model training by a per-browser switch, GenAI unless
# changed; this query opens the model-training view (the experiments' tag alone does not, in 3.17).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def _http(url: str | None) -> str | None:
    return url.rstrip("/") if url and url.startswith(("http://", "https://")) else None


def mlflow_ui() -> str | None:
    return _http(os.environ.get("CMACLIP_MLFLOW_UI_URL") or settings.tracking_uri())


def airflow_ui() -> str | None:
    return _http(os.environ.get("AIRFLOW__API__BASE_URL"))


def markdown(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"


def mlflow_run(run_id: str, experiment_id: str, name: str | None = None) -> str:
    """The run by its name, linked; without a UI, its name and its id (what `mlflow runs describe` takes)."""
    base = mlflow_ui()
    if not base:
        return f"`{name}` (run `{run_id}`)" if name and name != run_id else f"`{run_id}`"
    return markdown(name or run_id, f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}")


def mlflow_experiment_url(experiment_id: str) -> str | None:
    base = mlflow_ui()
    return f"{base}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}" if base else None


def model_version(name: str, version: str) -> str:
    base = mlflow_ui()
    url = f"{base}/#/models/{quote(name, safe='')}/versions/{version}" if base else None
    return markdown(f"{name} v{version}", url)


def airflow_run(dag_id: str, run_id: str) -> str:
    base = airflow_ui()
    url = f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}" if base else None
    return markdown(f"{dag_id} / {run_id}", url)
