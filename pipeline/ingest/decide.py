"""Ingest's whole-catalog decisions, taken in one streaming pass over the staged groups' per-row metadata
(never the image bytes or titles): which row keeps each duplicated product_id, where each kept row goes in
the dataset (split, part, row of its group), the label counts and vocabularies, and the quarantine file.

The groups' rows are staged in dataset order (staging.ORDER), so a k-way merge of them (external_sort.merged:
a fixed fan-in, in passes when there are more groups) is the whole catalog in dataset order: a product's rows
are neighbours (one product_id, one split key), the kept rows come out split by split (key order is SPLITS
order) and in position order within their split. Memory is bounded by the merge's batches, the vocabularies
and the rows of one product_id, never by the catalog: the order file is written as the merge goes, and the
duplicates are spilled locally and sorted back into catalog order (external_sort.sorted_tables).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import reasons
from ..contracts import QUARANTINE_SCHEMA
from ..io import storage
from ..io.parquet_writer import AtomicParquetWriter
from ..manifests import StagedGroup
from .external_sort import FAN_IN, merged, sorted_tables
from .plan import SPLITS, IngestParams
from .staging import ORDER

STREAM_ROWS = 65_536      # rows per batch (and per row group) of the order and quarantine files
READ_ROWS = 256           # rows per batch read from a group's files
READ_BUFFER = 64 << 10    # a group's column chunks are read page by page through this buffer (per column)
DUPLICATES = "duplicates.parquet"    # decide's spill of the duplicates, in dataset order
ROW = "__row"             # a staged row's number in its group's rows.parquet
METADATA = ("__seq", "__group", "__key", "split", "product_id", "__content_hash", "__image_sha", "__title_sha",
            "__labels_key")
DUPLICATE_SCHEMA = pa.schema([("__seq", pa.int64()), ("product_id", pa.string()), ("detail", pa.string())])
ORDER_SCHEMA = pa.schema([("split", pa.string()), ("part", pa.int64()), ("grp", pa.int32()), ("row", pa.int64())])


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


def decide(markers: list[StagedGroup], params: IngestParams, folder: str, order_uri: str,
           fan_in: int = FAN_IN) -> Decisions:
    """Rank, keep and place the staged rows: the kept rows' sources to the order file at `order_uri` (split
    by split in SPLITS order, then position; part = position // part_rows), the duplicates spilled under
    `folder` (local, existing; it also takes the merge's passes) for `write_quarantine`."""
    spilled = os.path.join(folder, DUPLICATES)
    columns = [*METADATA, *params.tasks]
    streams = [_group_rows(m.rows, columns) for m in markers]
    with AtomicParquetWriter(order_uri, ORDER_SCHEMA, STREAM_ROWS) as order, \
            pq.ParquetWriter(spilled, DUPLICATE_SCHEMA) as duplicates:
        pass_ = _Pass(params, order, duplicates)
        for table in merged(streams, ORDER, folder, READ_ROWS, fan_in):
            pass_.take(table)
        pass_.finish()
    rows = [(task, label, split, n) for (task, label, split), n in pass_.labels.items()]
    return Decisions(pass_.by_split, pass_.duplicates, label_stats(rows, params.tasks, params.min_class_count))


def _group_rows(uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """A group's staged metadata with each row's number in its rows.parquet (`ROW`), batch by batch."""
    at = 0
    for batch in storage.parquet_file(uri, READ_BUFFER).iter_batches(READ_ROWS, columns=columns):
        yield batch.append_column(ROW, pa.array(np.arange(at, at + batch.num_rows), pa.int64()))
        at += batch.num_rows


class _Pass:
    """The decisions over the merged rows, one product_id's rows at a time: its kept row placed in the order
    file and counted, the others spilled as duplicates."""

    def __init__(self, params: IngestParams, order: AtomicParquetWriter, duplicates: pq.ParquetWriter):
        self.tasks, self.part_rows = params.tasks, params.part_rows
        self.order, self.spill = order, duplicates
        self.by_split = {s: 0 for s in SPLITS}
        self.duplicates = 0
        self.labels: Counter[tuple[str, str, str]] = Counter()
        self.product: list[dict[str, Any]] = []
        self.placed: list[tuple[str, int, int, int]] = []
        self.lost: list[tuple[int, str, str]] = []

    def take(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            if self.product and row["product_id"] != self.product[0]["product_id"]:
                self._decide()
            self.product.append(row)
        self._flush()

    def finish(self) -> None:
        if self.product:
            self._decide()
        self._flush()

    def _decide(self) -> None:
        rows, self.product = self.product, []
        kept = min(rows, key=lambda r: (r["__content_hash"], r["__seq"]))
        split = kept["split"]
        self.placed.append((split, self.by_split[split] // self.part_rows, kept["__group"], kept[ROW]))
        self.by_split[split] += 1
        self.labels.update((t, kept[t], split) for t in self.tasks if kept[t] is not None)
        self.lost.extend((r["__seq"], r["product_id"], duplicate_detail(r, kept)) for r in rows if r is not kept)

    def _flush(self) -> None:
        if self.placed:
            self.order.write(_table(self.placed, ORDER_SCHEMA))
        if self.lost:
            self.spill.write_table(_table(self.lost, DUPLICATE_SCHEMA))
            self.duplicates += len(self.lost)
        self.placed, self.lost = [], []


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(zip(*rows), schema)], schema=schema)


def duplicate_detail(row: dict[str, Any], kept: dict[str, Any]) -> str:
    """What a row that lost its product_id differs in from the kept one. Hashes missing on either side do not
    count as a difference for the image and labels, and do for the title (a missing title is a title)."""
    differs = [what for what, column, missing_differs in (("image", "__image_sha", False),
                                                           ("title", "__title_sha", True),
                                                           ("labels", "__labels_key", False))
               if _differs(row[column], kept[column], missing_differs)]
    return (f"another row with this id was kept (content hash {kept['__content_hash'][:12]}); "
            f"this one differs in: {', '.join(differs) or 'nothing (exact copy)'}")


def _differs(a: str | None, b: str | None, missing_differs: bool) -> bool:
    if a is None or b is None:
        return missing_differs and (a is None) != (b is None)
    return a != b


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


def write_quarantine(markers: list[StagedGroup], folder: str, uri: str) -> None:
    """The groups' quarantined rows and the duplicates `decide` spilled under `folder` (sorted there), in
    catalog order, to `uri`: the groups are consecutive runs of the catalog, so their quarantine files one
    after the other are in catalog order already, and merged with the sorted duplicates by seq."""
    spilled = _duplicate_rows(os.path.join(folder, DUPLICATES))
    sorted_duplicates = sorted_tables(spilled, ["__seq"], folder, READ_ROWS)
    streams = [_chained(m.quarantine for m in markers), (b for t in sorted_duplicates for b in t.to_batches())]
    with AtomicParquetWriter(uri, QUARANTINE_SCHEMA, STREAM_ROWS) as writer:
        for table in merged(streams, ["__seq"], folder, STREAM_ROWS):
            n = table.num_rows
            writer.write(pa.table({"product_id": table["product_id"], "stage": pa.repeat("ingest", n),
                                   "reason": table["reason"], "detail": table["detail"]}).cast(QUARANTINE_SCHEMA))


def _duplicate_rows(path: str) -> Iterator[pa.Table]:
    reason = pa.scalar(reasons.DUPLICATE_ID)
    for batch in pq.ParquetFile(path).iter_batches(STREAM_ROWS):
        yield pa.table({"__seq": batch["__seq"], "product_id": batch["product_id"],
                        "reason": pa.repeat(reason, batch.num_rows), "detail": batch["detail"]})
    os.remove(path)


def _chained(uris: Iterator[str]) -> Iterator[pa.RecordBatch]:
    for uri in uris:
        yield from storage.parquet_file(uri, READ_BUFFER).iter_batches(READ_ROWS)
