"""Write a shard: its predictions streamed into one Parquet file that appears only when the shard
completes (`io.parquet_writer`), in row groups of `layout.ROW_GROUP_ROWS` rows, and its quarantine rows (few)
written at the end. Both files carry the schema and the model's lineage as key-value metadata. The rows
scored here get this run's lineage; the rows carried over (pipeline/scoring/carry_over.py) are written as
the published state holds them, with the lineage of the run that scored them."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pyarrow as pa

from ..contracts import (CONTENT_HASH, CONTRACT, KEY, QUARANTINE_SCHEMA, lineage_values, prediction_schema,
                         quarantine_table)
from ..io import storage
from ..io.parquet_writer import AtomicParquetWriter, write_table
from ..manifests import ShardLineage
from .layout import ROW_GROUP_ROWS
from .predictor import Predictor

METADATA_KEY = b"cmaclip"          # Parquet key-value metadata: schema + model lineage as JSON


def _metadata(schema: pa.Schema, lineage: ShardLineage, predictor: Predictor) -> dict[bytes, bytes]:
    meta = {"contract": CONTRACT, "columns": {f.name: str(f.type) for f in schema}, **lineage.to_dict(),
            "labels": predictor.labels, "thresholds": predictor.thresholds}
    return {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}


class ShardWriter:
    """Streams a shard's predictions to a Parquet file that appears only when the shard completes, and
    collects its quarantine rows (few) to write at the end."""

    def __init__(self, uris: dict[str, str], predictor: Predictor, lineage: ShardLineage, scored_at: datetime):
        self.uris = uris
        schema = prediction_schema(predictor.tasks, lineage.explain)
        self.schema = schema.with_metadata(_metadata(schema, lineage, predictor))
        self.quarantine_metadata = _metadata(QUARANTINE_SCHEMA, lineage, predictor)
        self.constants = lineage_values(lineage.model_name, lineage.model_version, lineage.run_id, scored_at)
        self.scored = self.carried = 0
        self.quarantine: list[tuple] = []

    @property
    def predicted(self) -> int:
        return self.scored + self.carried

    def __enter__(self) -> "ShardWriter":
        self._predictions = AtomicParquetWriter(self.uris["predictions"], self.schema, ROW_GROUP_ROWS)
        return self

    def add(self, product_ids: list[str], content_hashes: list[str], columns: dict[str, Any],
            quarantine: list[tuple]) -> None:
        """Rows scored by this run (and the batch's quarantine rows)."""
        self.quarantine.extend(quarantine)
        if not product_ids:
            return
        n = len(product_ids)
        arrays = {KEY.name: product_ids, CONTENT_HASH.name: content_hashes, **columns,
                  **{k: [v] * n for k, v in self.constants.items()}}
        self._predictions.write(pa.RecordBatch.from_pydict(arrays, schema=self.schema))
        self.scored += n

    def carry(self, rows: pa.Table) -> None:
        """Rows carried over: the published state's rows, every column as it holds them."""
        if rows.num_rows:
            self._predictions.write(rows.select(self.schema.names).cast(self.schema))
            self.carried += rows.num_rows

    def __exit__(self, kind, value, tb) -> None:
        self._predictions.__exit__(kind, value, tb)  # commits, or on an exception discards
        if kind is None and self.quarantine:
            write_table(self.uris["quarantine"], quarantine_table(self.quarantine, self.quarantine_metadata))


def remove_stale_temps(uri: str) -> None:
    """Temporary files of a killed writer (hidden `.<name>.tmp-*`, invisible to readers) are removed
    when the shard is redone, so a crash leaves nothing behind for long."""
    fs, path = storage.filesystem(uri)
    folder, name = path.rsplit("/", 1)
    if storage.is_local(fs) and fs.isdir(folder):
        for stale in fs.glob(f"{folder}/.{name}.tmp-*"):
            fs.rm(stale)
