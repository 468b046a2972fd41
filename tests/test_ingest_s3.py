"""The same ingest against a real S3 API: moto's server on 127.0.0.1, s3:// in and out."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmaclip.config import load_config
from pipeline import reasons
from pipeline.ingest.dataset import CatalogError, ingest, read_labels, read_manifest
from pipeline.io import storage
from pipeline.synthetic import BAD_ROWS, make_catalog, make_row
from pipeline.training.data import make_loader

pytestmark = pytest.mark.services


def test_storage_roundtrip_on_s3(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "dir/x.json")
    storage.write_json(uri, {"a": 1})
    assert storage.read_json(uri) == {"a": 1}
    with pytest.raises(RuntimeError):
        with storage.atomic_output(storage.join(s3_bucket, "dir/never.bin")) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert storage.list_files(storage.join(s3_bucket, "dir")) == [uri]
    assert storage.content_version(uri).startswith("etag:")
    con = duckdb.connect()
    storage.register_duckdb(con, s3_bucket)
    with storage.atomic_output(storage.join(s3_bucket, "t.parquet")) as f:
        pq.write_table(pa.table({"a": [1, 2, 3]}), f)
    assert con.execute("SELECT sum(a) FROM read_parquet($p)", {"p": storage.join(s3_bucket, "t.parquet")}).fetchone()[0] == 6


def test_ingest_s3_in_and_out(s3_bucket: str) -> None:
    catalog = storage.join(s3_bucket, "catalog/products.parquet")
    make_catalog(150, catalog, seed=2, with_bad_rows=True)
    out = storage.join(s3_bucket, "datasets/v1")
    manifest = ingest(storage.join(s3_bucket, "catalog"), "color,pattern,style", out, min_class_count=1)

    counts = manifest["counts"]
    assert counts["rows_in"] == 150 + len(BAD_ROWS) + 1
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]
    assert manifest["input"]["files"][0]["version"].startswith("etag:")
    assert read_manifest(out).to_dict() == manifest and set(read_labels(out)) == {"color", "pattern", "style"}

    q = pq.read_table(storage.open_input(storage.join(out, "quarantine.parquet"))).to_pylist()
    expected = {f"bad-{k}": r for k, r in BAD_ROWS.items() if r and k not in ("missing_id",)}
    got = {r["product_id"]: r["reason"] for r in q}
    assert got == expected | {None: reasons.PRODUCT_ID_MISSING}

    files = storage.list_files(storage.join(out, "dataset"))
    assert files and all(f.startswith("s3://") and "/part-" in f for f in files)
    loader = make_loader(out, "train", load_config("tiny"), batch_size=32, num_workers=0)
    assert sum(len(b["product_id"]) for b in loader) == counts["rows_by_split"]["train"]


def test_s3_file_level_error_names_the_object(s3_bucket: str) -> None:
    bad = storage.join(s3_bucket, "broken/catalog.parquet")
    storage.write_bytes(bad, b"")
    with pytest.raises(CatalogError, match="empty file"):
        ingest(bad, "color", storage.join(s3_bucket, "out"))


def test_image_uri_rows_read_from_s3(s3_bucket: str) -> None:
    rows = []
    for i in range(6):
        row = make_row(12, i)
        storage.write_bytes(storage.join(s3_bucket, f"images/{i}.jpg"), row.pop("image"))
        rows.append(row | {"image_uri": f"images/{i}.jpg"})            # relative to the catalog file
    rows.append(make_row(12, 99) | {"image_uri": storage.join(s3_bucket, "images/missing.jpg")})
    rows[-1].pop("image")
    catalog = storage.join(s3_bucket, "catalog.parquet")
    with storage.atomic_output(catalog) as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    manifest = ingest(catalog, "color,pattern,style", storage.join(s3_bucket, "out"), min_class_count=1)
    assert manifest["counts"]["rows_kept"] == 6
    assert manifest["counts"]["quarantined_by_reason"] == {reasons.IMAGE_FETCH_FAILED: 1}


def test_the_dags_ingest_in_groups_staged_on_s3_gives_the_local_dataset(s3_bucket: str, tmp_path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """plan_ingest -> stage_group per group -> finish_ingest with the run folder on S3 (the staged groups, the
    decisions' DuckDB reads and the parts all go through the object store): the dataset of a local ingest."""
    import json

    from pipeline.orchestration import airflow_tasks as orch

    make_catalog(180, str(tmp_path / "catalog.parquet"), seed=4, with_bad_rows=True)
    catalog = storage.join(s3_bucket, "catalog/products.parquet")
    with storage.atomic_output(catalog) as f:
        pq.write_table(pq.read_table(tmp_path / "catalog.parquet"), f, row_group_size=60)
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", f"{s3_bucket}/")
    run = storage.join(s3_bucket, "runs/retrain-1")
    planned = orch.plan_ingest(catalog, ["color", "pattern", "style"], run, groups=3)
    assert len(planned["groups"]) == 3
    for group in planned["groups"]:
        orch.stage_ingest_group(planned["plan"], group, run)
    finished = orch.finish_ingest(planned["plan"], run)
    assert not storage.exists(storage.join(run, "ingest-staging"))

    local = tmp_path / "local"
    ingest(catalog, "color,pattern,style", str(local), workers=1)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote = storage.read_bytes(storage.join(finished["dataset_uri"], str(path.relative_to(local))))
        if path.name == "manifest.json":
            assert {**json.loads(remote), "run": None} == {**json.loads(path.read_bytes()), "run": None}
        else:
            assert remote == path.read_bytes(), path.name
    assert finished["rows_kept"] == read_manifest(str(local)).counts.rows_kept
