"""The first task of each DAG checks every param in seconds (`validate_retrain`, `validate_scoring`), and an
error retrying cannot fix fails any task at once (`fail_fast`): the functions behind them, without Airflow."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.catalog import CatalogError
from pipeline.orchestration import airflow_tasks as orch
from mlflow_support import mlflow_home

RETRAIN_NAMES = ("catalog_uri", "tasks", "config", "epochs", "target_precision", "model_name", "promote",
                 "training_processes", "work_uri")
SCORING_NAMES = ("catalog_uri", "model", "predictions_uri", "rows_per_shard", "explain", "full", "publish_anyway")


@pytest.fixture
def data(tmp_path, monkeypatch):
    """The allowed storage, with a small catalog (no images needed: only footers are read)."""
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", f"{folder}/")
    pq.write_table(pa.table({"product_id": ["a", "b"], "title": ["red shirt", "blue hat"], "image": [b"x", b"y"],
                             "color": ["red", "blue"], "pattern": ["plain", "plain"]}), folder / "catalog.parquet")
    return folder


def retrain_params(data, **changes):
    params = {"catalog_uri": str(data / "catalog.parquet"), "tasks": ["color", "pattern"], "config": "tiny",
              "epochs": {"warmup": 2}, "target_precision": 0.9, "model_name": "cmaclip", "promote": True,
              "training_processes": 1, "work_uri": str(data / "runs")}
    return {**params, **changes}


def test_good_retrain_params_pass_with_what_will_run(data):
    checked = orch.validate_retrain(retrain_params(data), RETRAIN_NAMES)
    assert checked["config"] == "tiny" and checked["epochs"]["warmup"] == 2 and "align" not in checked["epochs"]
    assert (checked["catalog_files"], checked["catalog_rows"], checked["image_column"]) == (1, 2, "image")
    assert not (data / "runs").exists()  # nothing written


def test_an_unknown_param_is_refused_with_the_name_it_resembles(data):
    params = retrain_params(data)
    params["epoch"] = params.pop("epochs")
    with pytest.raises(ValueError, match=r"unknown param 'epoch' \(did you mean 'epochs'\?\)"):
        orch.validate_retrain({**params, "epochs": {}}, RETRAIN_NAMES)


@pytest.mark.parametrize("changes, error, message", [
    ({"config": "nope"}, ValueError, "config 'nope' is neither a config in cmaclip/configs/"),
    ({"catalog_uri": "{data}/missing.parquet"}, CatalogError, "no Parquet files found"),
    ({"tasks": ["color", "style"]}, CatalogError, "missing column 'style'"),
    ({"catalog_uri": "/etc/passwd"}, ValueError, "catalog_uri '/etc/passwd' is outside the storage"),
    ({"work_uri": "s3://elsewhere/runs"}, ValueError, "work_uri 's3://elsewhere/runs' is outside the storage"),
])
def test_bad_retrain_params_fail_naming_what_to_fix(data, changes, error, message):
    changes = {k: v.format(data=data) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(error, match=message):
        orch.validate_retrain(retrain_params(data, **changes), RETRAIN_NAMES)


def test_a_config_file_that_does_not_load_is_named(data):
    (data / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="config '.*broken.json' does not load: JSONDecodeError"):
        orch.validate_retrain(retrain_params(data, config=str(data / "broken.json")), RETRAIN_NAMES)


def test_scoring_params_resolve_the_model_without_downloading_it(data, tmp_path):
    from pipeline.tracking import tracker

    params = {"catalog_uri": str(data / "catalog.parquet"), "model": "models:/shop@champion",
              "predictions_uri": str(data / "predictions"), "rows_per_shard": 10, "explain": False, "full": False,
              "publish_anyway": False}
    with mlflow_home(tmp_path / "home"):
        with pytest.raises(ValueError, match="model 'models:/shop@champion' names nothing"):
            orch.validate_scoring(params, SCORING_NAMES)
        client = tracker.client()
        client.create_registered_model("shop")
        # The version's source does not exist: validate looks the version up, it never reads the model.
        version = client.create_model_version("shop", source=str(tmp_path / "never-written")).version
        client.set_registered_model_alias("shop", "champion", version)
        checked = orch.validate_scoring(params, SCORING_NAMES)
        assert checked["model"] == f"models:/shop/{version}" and checked["catalog_rows"] == 2
        for missing in ("models:/shop/7", "models:/shop@challenger", "runs:/0123456789abcdef/model"):
            with pytest.raises(ValueError, match="names nothing"):
                orch.validate_scoring({**params, "model": missing}, SCORING_NAMES)
    with pytest.raises(ValueError, match="no checkpoint folder"):
        orch.validate_scoring({**params, "model": str(data / "checkpoint")}, SCORING_NAMES)
    with pytest.raises(ValueError, match=r"unknown params 'explian' \(did you mean 'explain'\?\), 'x'"):
        orch.validate_scoring({**params, "explian": True, "x": 1}, SCORING_NAMES)


class Failed(Exception):
    """Stands for Airflow's AirflowFailException."""


def test_errors_retrying_cannot_fix_fail_at_once_and_the_rest_keep_their_retries(data):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    def task(error: Exception):
        """The task's doc."""
        raise error

    wrapped = orch.fail_fast(task, Failed)
    assert (wrapped.__name__, wrapped.__doc__) == ("task", "The task's doc.")   # what Airflow reads
    for permanent in (ValueError("config 'nope' not found"), CatalogError("s3://b/c", "no Parquet files found"),
                      FileNotFoundError("gone"), MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)):
        with pytest.raises(Failed, match="not retried") as failed:
            wrapped(permanent)
        assert str(permanent) in str(failed.value) and failed.value.__cause__ is permanent
    for transient in (OSError("connection reset"), TimeoutError("read timed out"), RuntimeError("worker lost"),
                      MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE)):
        with pytest.raises(type(transient)):
            wrapped(transient)
