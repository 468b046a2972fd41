"""Sort a stream of Arrow tables by key columns within a fixed memory budget: rows are gathered into runs of
about `RUN_BYTES`, each run sorted in memory and written to a local Arrow file in small batches, and the runs
merged (`FAN_IN` at a time, in passes when there are more) reading one small batch of each at a time. `merged`
is that merge on its own, for streams that are sorted already (ingest's staged groups).

Memory is bounded by the constants, never by the number of rows: the staged rows of a group carry their
image bytes, so sorting them in DuckDB (whose sort of wide blobs runs out of memory rather than spilling) or
in memory would make memory grow with the catalog. Ties are broken by the last key column, which the caller
makes unique.
"""
from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

RUN_BYTES = 16 << 20          # rows sorted in memory at once (by default)
FAN_IN = 32                   # runs merged at once: the merge holds one batch of each
BATCH_BYTES = RUN_BYTES // FAN_IN
MAX_BATCH_ROWS = 256


def sorted_tables(tables: Iterable[pa.Table], keys: Sequence[str], folder: str, out_rows: int = 1024,
                  run_bytes: int | None = None) -> Iterator[pa.Table]:
    """The rows of `tables` sorted by `keys` (ascending), as tables of at most `out_rows` rows; runs of
    about `run_bytes` (default `RUN_BYTES`) are written under `folder` (which must exist) and removed as
    they are merged."""
    run_bytes, batch_bytes = (RUN_BYTES, BATCH_BYTES) if run_bytes is None else (run_bytes, run_bytes // FAN_IN)
    runs = _runs(tables, keys, folder, run_bytes, batch_bytes)
    yield from merged([_run_batches(path) for path in runs], keys, folder, out_rows, FAN_IN, batch_bytes)


def merged(streams: Sequence[Iterator[pa.RecordBatch]], keys: Sequence[str], folder: str, out_rows: int = 1024,
           fan_in: int = FAN_IN, batch_bytes: int = BATCH_BYTES) -> Iterator[pa.Table]:
    """The rows of `streams` (each sorted by `keys`, all of one schema) merged by `keys`, as tables of at
    most `out_rows` rows. At most `fan_in` streams are read at once: with more, they are merged `fan_in` at
    a time into Arrow files under `folder` (which must exist), in passes, until `fan_in` are left. A stream
    is a generator, so it opens its source only when the merge first reads it. Ties are broken by stream
    order: the earlier stream's row first."""
    level = 0
    while len(streams) > fan_in:
        level += 1
        paths = [_write_run(_merged(streams[i:i + fan_in], keys, out_rows),
                            os.path.join(folder, f"merge-{level}-{i:06d}.arrow"), batch_bytes)
                 for i in range(0, len(streams), fan_in)]
        streams = [_run_batches(path) for path in paths if path is not None]
    yield from _merged(streams, keys, out_rows)


def _runs(tables: Iterable[pa.Table], keys: Sequence[str], folder: str, run_bytes: int,
          batch_bytes: int) -> list[str]:
    runs, buffer, size = [], [], 0
    for table in tables:
        buffer.append(table)
        size += table.nbytes
        if size >= run_bytes:
            runs.append(_sort_run(buffer, keys, os.path.join(folder, f"run-{len(runs):06d}.arrow"), batch_bytes))
            buffer, size = [], 0
    if buffer:
        runs.append(_sort_run(buffer, keys, os.path.join(folder, f"run-{len(runs):06d}.arrow"), batch_bytes))
    return runs


def _sort_run(buffer: list[pa.Table], keys: Sequence[str], path: str, batch_bytes: int) -> str:
    table = pa.concat_tables(buffer)
    ordered = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))
    return _write_run(iter([ordered]), path, batch_bytes)


def _write_run(tables: Iterator[pa.Table], path: str, batch_bytes: int) -> str | None:
    """Tables into an Arrow file in batches of about `batch_bytes`, so its merge reads little at a time;
    None (and no file) when there are no rows."""
    with contextlib.ExitStack() as stack:
        writer = None
        for table in tables:
            if writer is None:
                sink = stack.enter_context(pa.OSFile(path, "wb"))
                writer = stack.enter_context(pa.ipc.new_file(sink, table.schema))
            rows = max(1, min(MAX_BATCH_ROWS, int(batch_bytes * table.num_rows / max(1, table.nbytes))))
            for batch in table.to_batches(max_chunksize=rows):
                writer.write_batch(batch)
    return None if writer is None else path


def _run_batches(path: str) -> Iterator[pa.RecordBatch]:
    """A run's batches, the file removed once read."""
    with pa.OSFile(path) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    os.remove(path)


class _Run:
    """A sorted stream read one batch at a time; `key()` is the current row's key tuple."""

    def __init__(self, batches: Iterator[pa.RecordBatch], keys: Sequence[str]):
        self.batches, self.keys = batches, keys
        self.batch, self.row, self.key_rows = None, 0, []
        self._load()

    def _load(self) -> None:
        self.batch, self.row = None, 0
        for batch in self.batches:
            if batch.num_rows:
                self.batch = batch
                self.key_rows = list(zip(*(batch.column(k).to_pylist() for k in self.keys)))
                return

    def key(self) -> tuple:
        return self.key_rows[self.row]

    def advance(self) -> bool:
        self.row += 1
        if self.row == self.batch.num_rows:
            self._load()
        return self.batch is not None


def _merged(streams: Sequence[Iterator[pa.RecordBatch]], keys: Sequence[str], out_rows: int) -> Iterator[pa.Table]:
    runs = [_Run(stream, keys) for stream in streams]
    heap = [(run.key(), i) for i, run in enumerate(runs) if run.batch is not None]
    heapq.heapify(heap)
    picks: list[tuple[pa.RecordBatch, int]] = []
    while heap:
        _, i = heap[0]
        run = runs[i]
        picks.append((run.batch, run.row))
        if run.advance():
            heapq.heapreplace(heap, (run.key(), i))
        else:
            heapq.heappop(heap)
        if len(picks) == out_rows:
            yield _gather(picks)
            picks = []
    if picks:
        yield _gather(picks)


def _gather(picks: list[tuple[pa.RecordBatch, int]]) -> pa.Table:
    """The picked rows, in pick order: one `take` per source batch, then one to interleave them."""
    by_batch: dict[int, tuple[pa.RecordBatch, list[int], list[int]]] = {}
    for out, (batch, row) in enumerate(picks):
        entry = by_batch.setdefault(id(batch), (batch, [], []))
        entry[1].append(row)
        entry[2].append(out)
    parts = [pa.Table.from_batches([batch.take(pa.array(rows, pa.int64()))]) for batch, rows, _ in by_batch.values()]
    where = np.concatenate([np.asarray(outs) for _, _, outs in by_batch.values()])
    inverse = np.empty(len(where), np.int64)
    inverse[where] = np.arange(len(where))
    return pa.concat_tables(parts).take(pa.array(inverse))
