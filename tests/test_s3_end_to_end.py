"""The whole job on object storage: catalog, dataset, training checkpoints, predictions and MLflow artifacts
all on S3 (moto's server on 127.0.0.1), with an `mlflow server` that proxies artifacts to S3.

    make catalog -> ingest -> warmup, end_to_end, tuning -> evaluate -> register -> plan -> score shards
    -> finalize -> publish

Each step is the `pipeline.orchestration.airflow_tasks` call the Airflow task makes, so this is the DAGs' path minus the
scheduler. Nothing but the MLflow server's SQLite file and local scratch folders is written to disk.
"""
from __future__ import annotations

import os
import uuid

import pyarrow.parquet as pq
import pytest

import servers

pytestmark = [pytest.mark.slow, pytest.mark.services]

TASKS = ["color", "pattern", "style"]
ROWS = 160


@pytest.fixture
def mlflow_on_s3(moto_s3, tmp_path, monkeypatch):
    """An MLflow server (SQLite backend) whose artifact store is s3://<fresh bucket>/artifacts on moto;
    this process (and the pipeline calls in it) talk to it over HTTP only."""
    from pipeline.io import storage

    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    storage.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
    # The server writes artifacts with boto3, which reads MLflow's own endpoint variable.
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_s3}
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow-server.db'}", f"s3://{bucket}/artifacts",
                               tmp_path / "mlflow-server.log", env) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("CMACLIP_HOME", str(tmp_path / "home"))
        # The client must not reach S3 itself: artifacts go through the server (mlflow-artifacts:/).
        monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
        yield {"url": url, "bucket": bucket}


def _objects(prefix: str) -> list[str]:
    from pipeline.io import storage
    fs, path = storage.filesystem(prefix)
    return fs.find(path) if fs.exists(path) else []


def test_pipeline_end_to_end_on_s3(s3_bucket, mlflow_on_s3, monkeypatch):
    import mlflow

    from pipeline.io import storage
    from pipeline.orchestration import airflow_tasks as orch
    from pipeline.synthetic import make_catalog

    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", f"{s3_bucket}/")  # as docker-compose sets the data bucket
    model_name = f"cmaclip-s3-{uuid.uuid4().hex[:6]}"
    catalog = f"{s3_bucket}/catalog/catalog.parquet"
    run_folder = f"{s3_bucket}/runs/retrain-1"
    predictions = f"{s3_bucket}/predictions"
    make_catalog(ROWS, catalog, seed=21)

    # Retrain: ingest, three stages (one epoch each), log the model, register it (first version: champion).
    dataset = orch.ingest_catalog(catalog, TASKS, run_folder)
    assert dataset["dataset_uri"].startswith("s3://") and storage.exists(f"{dataset['dataset_uri']}/manifest.json")
    state = orch.open_training(dataset, run_folder, "tiny", epochs={s: 1 for s in orch.STAGES},
                               model_name=model_name, dag_id="s3_end_to_end", run_id="retrain-1")
    for stage in orch.STAGES:
        state = orch.train_stage(state, stage)
    evaluated = orch.evaluate(state)
    registered = orch.register(evaluated)
    assert registered["new_champion"] and registered["version"] == "1"

    # Checkpoints were published to S3 per stage (a retry on another worker resumes from them).
    for stage in orch.STAGES:
        assert storage.exists(f"{state['training']['out_uri']}/stages/{stage}/latest.json"), stage

    # MLflow: the runs' artifacts went through the server into the artifact bucket.
    run = mlflow.get_run(evaluated["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    artifacts = _objects(f"s3://{mlflow_on_s3['bucket']}/artifacts")
    assert any(key.endswith("/MLmodel") for key in artifacts), artifacts[:20]
    assert any(key.endswith(".safetensors") for key in artifacts), artifacts[:20]

    # Nightly scoring with the champion: plan, score every group (as mapped tasks would), finalize, publish.
    planned = orch.plan_scoring(catalog, f"models:/{model_name}@champion", rows_per_shard=64, out_uri=predictions)
    assert planned["run"]["model"] == f"models:/{model_name}/1"
    assert len(planned["groups"]) >= 2
    scored = [orch.score_group(planned["run"], group, predictions) for group in planned["groups"]]
    assert sum(s["rows_in"] for s in scored) == ROWS
    final = orch.finalize_scoring(planned["run"], predictions)
    assert final["rows_in"] == final["predicted"] + final["quarantined"] == ROWS
    published = orch.publish_predictions(predictions, catalog)

    shard_files = [k for k in _objects(f"{predictions}/predictions") if k.endswith(".parquet")]
    assert len(shard_files) == sum(len(g["shards"]) for g in planned["groups"])
    assert all(f"model={model_name}/version=1/" in k for k in shard_files)
    latest = published["latest"]
    assert latest.startswith("s3://")
    table = _read(latest)
    assert table.num_rows == final["predicted"]
    assert {"product_id", "color", "color_confidence", "model_version"} <= set(table.column_names)
    assert published["catalog"].startswith("s3://") and published["catalog_rows"] == ROWS

    # A rerun of scoring resumes the same run and skips every committed shard.
    again = orch.score_group(planned["run"], planned["groups"][0], predictions)
    assert again["skipped"] == again["shards"]


def _read(uri: str):
    from pipeline.io import storage
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs)
