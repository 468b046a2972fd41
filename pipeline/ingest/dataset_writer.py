"""Write the dataset's parts from the staged groups, one part per call (`write_part`), so parts can be written
in parallel processes; each part is committed atomically, in row groups of a fixed size (`io.parquet_writer`),
because the row group is the unit the loader shuffles and shards across workers and ranks.

A part holds the rows of one split at positions [p x part_rows, (p + 1) x part_rows) in dataset order. Its
boundaries come from the decisions (pipeline.ingest.decide), never from the groups, and every group staged
its rows in dataset order, so a part reads one contiguous range of each group's rows.parquet and interleaves
them as the order file says: each staged image is read once, and the part's bytes are the same for any
number of groups. Memory: one order slice (two integers a row) and a small batch per group.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import storage
from ..io.parquet_writer import AtomicParquetWriter

READ_BUFFER = 1 << 20     # staged rows are read page by page through this buffer
READ_ROWS = 64            # rows per batch read from a group
WRITE_ROWS = 1024         # rows interleaved at a time


def dataset_schema(tasks: tuple[str, ...], metadata: dict[str, str]) -> pa.Schema:
    fields = [pa.field("product_id", pa.string(), nullable=False), ("title", pa.string()),
              ("image", pa.binary()), *[(t, pa.string()) for t in tasks], ("split", pa.string())]
    return pa.schema(fields, metadata=metadata)


def part_name(split: str, index: int) -> str:
    return f"part-{split}-{index:05d}.parquet"


@dataclass(frozen=True)
class PartJob:
    """Everything one part needs (picklable: a worker process gets it)."""
    split: str
    index: int
    uri: str                             # where the part goes
    order: str                           # the order file (decide.decide)
    start: int                           # the part's first row in the order file
    rows: int
    groups: tuple[str, ...]              # each group's rows.parquet, by group number
    tasks: tuple[str, ...]
    metadata: dict[str, str]             # the dataset schema's metadata
    rare: dict[str, dict[str, int]]      # per task, the labels masked as rare
    row_group_rows: int


def write_part(job: PartJob) -> int:
    """Write the part and commit it; its rows."""
    sources = _read(storage.parquet_file(job.order), job.start, job.start + job.rows, ["split", "part", "grp", "row"])
    order = pa.concat_tables(pa.Table.from_batches([b]) for b in sources)
    if order.num_rows != job.rows or order["part"].unique().to_pylist() != [job.index] or \
            order["split"].unique().to_pylist() != [job.split]:
        raise RuntimeError(f"the order file does not hold part {job.index} of {job.split} at its rows "
                           f"{job.start}..{job.start + job.rows}")
    groups, rows = order["grp"].to_numpy(), order["row"].to_numpy()
    schema = dataset_schema(job.tasks, job.metadata)
    readers = {g: _GroupRows(job.groups[g], rows[groups == g], schema.names) for g in np.unique(groups)}
    with AtomicParquetWriter(job.uri, schema, job.row_group_rows) as writer:
        for start in range(0, job.rows, WRITE_ROWS):
            table = _interleave(groups[start:start + WRITE_ROWS], readers)
            writer.write(_mask_rare(table.select(schema.names).cast(schema), job.rare))
    return job.rows


def _read(pf: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The rows [start, stop) of a Parquet file, in batches, reading only the row groups that hold them."""
    meta = pf.metadata
    offsets = list(itertools.accumulate((meta.row_group(i).num_rows for i in range(meta.num_row_groups)), initial=0))
    first, last = bisect.bisect_right(offsets, start) - 1, bisect.bisect_left(offsets, stop) - 1
    at = offsets[first]
    for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=range(first, last + 1), columns=columns):
        lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
        if lo < hi:
            yield batch.slice(lo, hi - lo)
        at += batch.num_rows
        if at >= stop:
            return


class _GroupRows:
    """The given rows (ascending) of one group's rows.parquet, handed out in order, `take(k)` at a time."""

    def __init__(self, uri: str, rows: np.ndarray, columns: list[str]):
        if np.any(np.diff(rows) <= 0):
            raise RuntimeError(f"{uri}: rows are not in dataset order for this part")
        self.rows, self.taken = rows, 0
        self.batches = _read(storage.parquet_file(uri, READ_BUFFER), int(rows[0]), int(rows[-1]) + 1, columns)
        self.batch, self.batch_start = None, int(rows[0])

    def take(self, k: int) -> pa.Table:
        wanted = self.rows[self.taken:self.taken + k]
        self.taken += k
        pieces, i = [], 0
        while i < len(wanted):
            while self.batch is None or wanted[i] >= self.batch_start + self.batch.num_rows:
                if self.batch is not None:
                    self.batch_start += self.batch.num_rows
                self.batch = next(self.batches)
            end = int(np.searchsorted(wanted, self.batch_start + self.batch.num_rows))
            pieces.append(self.batch.take(pa.array(wanted[i:end] - self.batch_start)))
            i = end
        return pa.Table.from_batches(pieces)


def _interleave(groups: np.ndarray, readers: dict[int, _GroupRows]) -> pa.Table:
    """The next rows of each group, interleaved as `groups` (each row's group, in dataset order) says."""
    tables, where = [], []
    for g in np.unique(groups):
        positions = np.flatnonzero(groups == g)
        tables.append(readers[g].take(len(positions)))
        where.append(positions)
    inverse = np.empty(len(groups), np.int64)
    inverse[np.concatenate(where)] = np.arange(len(groups))
    return pa.concat_tables(tables).take(pa.array(inverse))


def _mask_rare(table: pa.Table, rare: dict[str, dict[str, int]]) -> pa.Table:
    for task, labels in rare.items():
        if labels:
            column = table.column(task)
            masked = pc.if_else(pc.is_in(column, value_set=pa.array(list(labels), pa.string())),
                                pa.scalar(None, pa.string()), column)
            table = table.set_column(table.schema.get_field_index(task), task, masked)
    return table
