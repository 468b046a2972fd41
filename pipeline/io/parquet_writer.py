"""The one way the pipeline writes Parquet: a file that appears at its URI whole or not at all
(`storage.atomic_output`: a hidden temporary renamed into place, or one object put), optionally in row
groups of a fixed size. The dataset parts, the predictions and quarantine files, the published tables and
the synthetic catalogs are all written through it."""
from __future__ import annotations

import contextlib
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

COMPRESSION = "zstd"


class AtomicParquetWriter:
    """`write(table)` any number of times; `close()` (or the end of a `with` block) commits the file and
    `abort()` (or an exception in the block) discards it. With `row_group_rows`, rows are buffered into row
    groups of exactly that many rows, the last one shorter: pyarrow alone makes at least one row group per
    write, and a row group is what the readers shard and shuffle by. Without it, each write is written as it
    comes. `rows`: the rows written so far, buffered ones included."""

    def __init__(self, uri: str, schema: pa.Schema, row_group_rows: int | None = None,
                 compression: str = COMPRESSION):
        self.uri, self.schema = uri, schema
        self.row_group_rows = None if row_group_rows is None else max(1, row_group_rows)
        self.rows = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        with contextlib.ExitStack() as stack:  # a writer that fails to open leaves no temporary behind
            sink = stack.enter_context(storage.atomic_output(uri))
            self._parquet = pq.ParquetWriter(sink, schema, compression=compression, use_dictionary=_dictionary(schema))
            self._stack = stack.pop_all()

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if value is None:
            self.close()
        else:
            self.abort(value)

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        self.rows += data.num_rows
        if self.row_group_rows is None:
            self._parquet.write(data)
            return
        self._buffer.append(pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data)
        self._buffered += data.num_rows
        while self._buffered >= self.row_group_rows:
            self._write_group(self.row_group_rows)

    def _write_group(self, n: int) -> None:
        table = pa.concat_tables(self._buffer)
        self._buffer = [table.slice(n)] if table.num_rows > n else []
        self._buffered = table.num_rows - n
        # One chunk per column: pages are cut the same way however the rows arrived, so the same rows make
        # the same bytes (ingest's parts, whatever the number of groups).
        self._parquet.write_table(table.slice(0, n).combine_chunks(), row_group_size=n)

    def close(self) -> None:
        """Write what is buffered and the footer, then commit (rename or upload)."""
        try:
            if self._buffered:
                self._write_group(self._buffered)
            self._parquet.close()
        except BaseException as exc:
            self.abort(exc)
            raise
        self._stack.close()

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the file: nothing appears at the URI, and the temporary is removed."""
        with contextlib.suppress(Exception):
            self._parquet.close()
        exc = exc if exc is not None else RuntimeError(f"writing {self.uri} was aborted")
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


def write_table(uri: str, table: pa.Table, compression: str = COMPRESSION) -> None:
    """One table, committed atomically; its schema metadata is kept."""
    with AtomicParquetWriter(uri, table.schema, compression=compression) as writer:
        writer.write(table)


def _dictionary(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: all but binary ones (images), whose values never repeat, so
    pyarrow would build a dictionary for every page only to fall back to plain encoding."""
    return [f.name for f in schema if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
