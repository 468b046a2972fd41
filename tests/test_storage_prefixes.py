"""DAG params that name storage are confined to `CMACLIP_STORAGE_PREFIXES` (default: `CMACLIP_HOME`) by the
image roots rule: on normalised paths and path boundaries; the orchestration layer refuses a param outside
before it reads or writes anything."""
from __future__ import annotations

import os

import pytest

from pipeline import settings
from pipeline.orchestration import airflow_tasks as orch


@pytest.fixture
def allowed(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", f"s3://cmaclip/, {data}/")
    return data


@pytest.mark.parametrize("uri", [
    "s3://cmaclip/catalog/", "s3://cmaclip", "s3://cmaclip/runs/../predictions/x.parquet",
    "s3://cmaclip/catalog/*.parquet", "{data}/catalog.parquet", "{data}", "file://{data}/runs",
    "{data}/runs/./a//b",
])
def test_uris_under_a_prefix_are_allowed(allowed, uri):
    uri = uri.format(data=allowed)
    assert orch.check_storage_uri(uri, "catalog_uri") == uri


@pytest.mark.parametrize("uri", [
    "s3://cmaclip-evil/catalog/",          # a longer bucket name is not under the bucket
    "s3://cmaclip/../evil/x",              # `..` out of the bucket
    "s3a://cmaclip/x",                     # another scheme is another store
    "s3://other/cmaclip/x",
    "{data}-evil/x", "{data}/../secret", "file://{data}/../secret", "{data}/*/../../secret",
    "/etc/passwd", "file:///etc/passwd", "relative/path",
    "simplecache::s3://cmaclip/x",         # an fsspec chain: no prefix can bound it
    "s3://cmaclip/x::file:///etc/passwd",
    "memory://cmaclip/x", "",
])
def test_uris_outside_every_prefix_are_refused(allowed, uri):
    uri = uri.format(data=allowed)
    with pytest.raises(ValueError, match="catalog_uri .* outside the storage the DAGs may use: s3://cmaclip/"):
        orch.check_storage_uri(uri, "catalog_uri")


def test_a_symlink_does_not_move_a_path_out_of_its_prefix(allowed, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", allowed / "link")
    with pytest.raises(ValueError, match="outside"):
        orch.check_storage_uri(str(allowed / "link" / "key.pem"), "predictions_uri")


def test_unset_allows_only_the_home(tmp_path, monkeypatch):
    monkeypatch.delenv("CMACLIP_STORAGE_PREFIXES", raising=False)
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path / "home"))
    assert settings.storage_prefixes() == [str(tmp_path / "home")]
    orch.check_storage_uri(str(tmp_path / "home" / "catalog" / "catalog.parquet"), "catalog_uri")
    with pytest.raises(ValueError, match="CMACLIP_STORAGE_PREFIXES"):
        orch.check_storage_uri("s3://cmaclip/catalog/", "catalog_uri")


def test_orchestration_refuses_params_outside_the_prefixes_before_touching_storage(allowed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "catalog.parquet").write_bytes(b"PAR1")
    run_folder = str(allowed / "runs" / "r1")
    with pytest.raises(ValueError, match="catalog_uri"):
        orch.ingest_catalog(str(outside / "catalog.parquet"), ["color"], run_folder)
    with pytest.raises(ValueError, match="work_uri"):
        orch.run_uri("s3://cmaclip-evil/runs", "cmaclip_retrain", "manual__1")
    with pytest.raises(ValueError, match="run folder"):
        orch.ingest_catalog(str(allowed / "catalog.parquet"), ["color"], str(outside / "runs"))
    with pytest.raises(ValueError, match="predictions_uri"):
        orch.publish_predictions(str(outside / "predictions"), str(allowed / "catalog.parquet"))
    with pytest.raises(ValueError, match="model"):
        orch.plan_scoring(str(allowed / "catalog.parquet"), str(outside / "checkpoint"), rows_per_shard=10,
                          out_uri=str(allowed / "predictions"))
    with pytest.raises(ValueError, match="predictions_uri"):  # the plan writes its duplicates file there
        orch.plan_scoring(str(allowed / "catalog.parquet"), str(allowed / "checkpoint"), rows_per_shard=10,
                          out_uri=str(outside / "predictions"))
    with pytest.raises(ValueError, match="config"):
        orch.open_training({"dataset_uri": run_folder}, run_folder, str(outside / "config.json"))
    with pytest.raises(ValueError, match="neither a config in cmaclip/configs/"):
        orch.open_training({"dataset_uri": run_folder}, run_folder, "../../../etc/cmaclip")
    assert not (allowed / "runs").exists() and not (outside / "runs").exists()
    assert orch.run_uri("s3://cmaclip/runs", "cmaclip_retrain", "manual__1") == \
        "s3://cmaclip/runs/cmaclip_retrain/manual__1"
