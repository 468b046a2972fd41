"""Ingest's whole-catalog decisions, taken by DuckDB over the staged groups' per-row metadata (DuckDB reads only
the columns a query names, never the image bytes): which row keeps each duplicated product_id, where each
kept row goes in the dataset (split, part, position), the label counts and vocabularies, and the quarantine
file. The SQL is in pipeline/io/queries/ingest_*.sql; the connection has a memory limit and spills beyond it
(`sql.connect`), so no decision holds a whole column of the catalog in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .. import reasons
from ..contracts import QUARANTINE_SCHEMA
from ..io.parquet_writer import AtomicParquetWriter
from ..io.sql import load_sql
from ..manifests import StagedGroup
from .plan import SPLITS, IngestParams

STREAM_ROWS = 65_536      # rows per batch (and per row group) of the order and quarantine files


@dataclass
class LabelStats:
    vocabularies: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    counts_by_split: dict[str, dict[str, dict[str, int]]]
    rare: dict[str, dict[str, int]]


@dataclass
class Decisions:
    by_split: dict[str, int]          # kept rows per split
    duplicates: int                   # rows quarantined as duplicate_id
    stats: LabelStats


def decide(con: Any, markers: list[StagedGroup], params: IngestParams) -> Decisions:
    """Rank, keep and place the staged rows (leaves temp tables `ranked`, `duplicates`, `kept`)."""
    staged = [m.rows for m in markers]
    con.execute(load_sql("ingest_rank"), {"staged": staged})
    con.execute(load_sql("ingest_duplicates"))
    con.execute(load_sql("ingest_kept"))
    by_split = {s: 0 for s in SPLITS} | dict(con.execute(load_sql("ingest_split_counts")).fetchall())
    duplicates = con.execute("SELECT count(*) FROM duplicates").fetchone()[0]
    rows = con.execute(load_sql("ingest_label_counts"), {"staged": staged, "tasks": list(params.tasks)}).fetchall()
    return Decisions(by_split, duplicates, label_stats(rows, params.tasks, params.min_class_count))


def label_stats(rows: list[tuple[str, str, str, int]], tasks: tuple[str, ...], min_count: int) -> LabelStats:
    """Vocabulary per task (sorted labels), counts, and the rare labels to mask (count < min_count)."""
    total: dict[str, Counter] = {t: Counter() for t in tasks}
    by_split: dict[str, dict[str, Counter]] = {t: {s: Counter() for s in SPLITS} for t in tasks}
    for task, label, split, n in rows:
        total[task][label] += n
        by_split[task][split][label] += n
    rare = {t: {lab: n for lab, n in sorted(total[t].items()) if n < min_count} for t in tasks}
    vocab = {t: sorted(lab for lab in total[t] if lab not in rare[t]) for t in tasks}
    counts = {t: {lab: total[t][lab] for lab in vocab[t]} for t in tasks}
    splits = {t: {s: {lab: by_split[t][s][lab] for lab in vocab[t] if by_split[t][s][lab]} for s in SPLITS}
              for t in tasks}
    return LabelStats(vocab, counts, splits, rare)


ORDER_SCHEMA = pa.schema([("split", pa.string()), ("part", pa.int64()), ("grp", pa.int32()), ("row", pa.int64())])


def write_order(con: Any, part_rows: int, uri: str) -> None:
    """The kept rows' sources, split by split (SPLITS order), part by part, in dataset order
    (queries/ingest_order.sql), to `uri`."""
    params = {"splits": list(SPLITS), "part_rows": part_rows}
    reader = con.sql(load_sql("ingest_order"), params=params).to_arrow_reader(STREAM_ROWS)
    _stream(reader, ORDER_SCHEMA, uri)


def write_quarantine(con: Any, markers: list[StagedGroup], uri: str) -> None:
    """The groups' quarantined rows and the duplicates, in catalog order (queries/ingest_quarantine.sql)."""
    params = {"quarantined": [m.quarantine for m in markers], "duplicate": reasons.DUPLICATE_ID}
    _stream(con.sql(load_sql("ingest_quarantine"), params=params).to_arrow_reader(STREAM_ROWS), QUARANTINE_SCHEMA, uri)


def _stream(reader: pa.RecordBatchReader, schema: pa.Schema, uri: str) -> None:
    # Fixed row groups: the file's bytes do not depend on how DuckDB happened to batch the result.
    with AtomicParquetWriter(uri, schema, STREAM_ROWS) as writer:
        for batch in reader:
            writer.write(pa.Table.from_batches([batch]).cast(schema))
