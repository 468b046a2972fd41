"""Finalized scoring runs made without a model, for the tests of publish, the report and the gate: the
prediction files and run manifest scoring would write, with the values a test chooses."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import contracts
from pipeline.io import storage
from pipeline.io.parquet_writer import AtomicParquetWriter
from pipeline.manifests import RunManifest
from pipeline.scoring.layout import manifest_uri, marker_uri, output_uris

LABELS = {"color": ["blue", "green", "red"], "style": ["casual", "formal"]}
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def prediction(product_id: str, run_id: str, night: int = 0, **values) -> dict:
    """One predictions row: every task confident in its first class unless `values` say otherwise
    (`color="red"`, `color_confidence=0.4`, `color=None` with `color_top="red"` for an abstention)."""
    row = {"product_id": product_id, "content_hash": values.get("content_hash", f"hash-{product_id}"),
           "model_name": "cmaclip", "model_version": "1", "run_id": run_id,
           "scored_at": START + timedelta(days=night)}
    for task, classes in LABELS.items():
        label = values.get(task, classes[0])
        row |= {task: label, f"{task}_top": values.get(f"{task}_top", label or classes[0]),
                f"{task}_confidence": values.get(f"{task}_confidence", 0.9),
                f"{task}_image_weight": values.get(f"{task}_image_weight", 0.5)}
    return row


def finalized_run(out: Path | str, run_id: str, rows: list[dict], night: int = 0, quarantined: int = 0,
                  shards: int = 2) -> RunManifest:
    """Write `rows` as the run's prediction files (in `shards` files, unsorted), placeholder done markers and
    its manifest, under `out` (any URI)."""
    out = str(out)
    schema = contracts.prediction_schema(list(LABELS)).with_metadata(
        {"cmaclip": json.dumps({"labels": LABELS, "run_id": run_id})})
    files = []
    for shard in range(shards):
        uri = output_uris(out, f"{shard:05d}", "cmaclip", "1", run_id)["predictions"]
        with AtomicParquetWriter(uri, schema) as writer:
            writer.write(pa.Table.from_pylist(rows[shard::shards], schema=schema))
        storage.write_text(marker_uri(out, run_id, f"{shard:05d}"), "{}")
        files.append(uri)
    manifest = RunManifest(
        contract=contracts.CONTRACT, run_id=run_id, plan_id=f"plan-{run_id}", catalog="catalog.parquet",
        input_fingerprint="f", rows_per_shard=len(rows), shards=shards, model_name="cmaclip", model_version="1",
        rows_in=len(rows) + quarantined, predicted=len(rows), quarantined=quarantined,
        reasons={"image_missing": quarantined} if quarantined else {}, predictions=files, quarantine=[],
        scoring_seconds=1.0, finalized_at=(START + timedelta(days=night, hours=1)).isoformat())
    manifest.write(manifest_uri(out, run_id))
    return manifest


def catalog(path: Path | str, rows: list[dict], schema: pa.Schema | None = None) -> str:
    """A catalog file of `rows` (product_id and label columns only: publish and the report read no image)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)
