"""Write a split-partitioned Parquet dataset in rolling parts, each committed atomically when complete.

Rows are buffered into row groups of a fixed size (pyarrow would otherwise make one row group per write
call), because the row group is the unit the loader shuffles and shards across workers and ranks.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

COMPRESSION = "zstd"


@dataclass
class _Part:
    name: str
    stack: contextlib.ExitStack
    writer: pq.ParquetWriter
    rows: int = 0


@dataclass
class _Split:
    buffer: list[pa.Table] = field(default_factory=list)
    buffered: int = 0
    part: _Part | None = None
    count: int = 0                      # parts started so far


class PartWriter:
    """`write(split, table)` any number of times inside `with`; `files[split]` lists the committed parts
    as {"path": name relative to the folder, "rows": n}."""

    def __init__(self, folder_uri: str, schema: pa.Schema, row_group_rows: int, rows_per_part: int):
        self.folder_uri = folder_uri
        self.schema = schema
        self.row_group_rows = max(1, row_group_rows)
        # Parts hold whole row groups and at most rows_per_part rows (at least one group).
        self.rows_per_part = max(1, rows_per_part // self.row_group_rows) * self.row_group_rows
        self.files: dict[str, list[dict[str, Any]]] = {}
        self._splits: dict[str, _Split] = {}

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc_type, exc, tb)

    def write(self, split: str, table: pa.Table) -> None:
        state = self._splits.setdefault(split, _Split())
        state.buffer.append(table)
        state.buffered += table.num_rows
        while state.buffered >= self.row_group_rows:
            self._write_group(split, state, self._take(state, self.row_group_rows))

    def close(self) -> None:
        for split, state in self._splits.items():
            if state.buffered:
                self._write_group(split, state, self._take(state, state.buffered))
            if state.part is not None:
                self._commit(split, state)

    @staticmethod
    def _take(state: _Split, n: int) -> pa.Table:
        table = pa.concat_tables(state.buffer)
        state.buffer = [table.slice(n)] if table.num_rows > n else []
        state.buffered = table.num_rows - n
        return table.slice(0, n)

    def _open(self, split: str, state: _Split) -> _Part:
        name = f"part-{split}-{state.count:05d}.parquet"
        state.count += 1
        stack = contextlib.ExitStack()
        f = stack.enter_context(storage.atomic_output(storage.join(self.folder_uri, name)))
        writer = pq.ParquetWriter(f, self.schema, compression=COMPRESSION)
        return _Part(name, stack, writer)

    def _write_group(self, split: str, state: _Split, group: pa.Table) -> None:
        if state.part is None:
            state.part = self._open(split, state)
        state.part.writer.write_table(group, row_group_size=group.num_rows)
        state.part.rows += group.num_rows
        if state.part.rows >= self.rows_per_part:
            self._commit(split, state)

    def _commit(self, split: str, state: _Split) -> None:
        part = state.part
        assert part is not None
        part.writer.close()
        part.stack.close()  # rename / upload happens here
        self.files.setdefault(split, []).append({"path": part.name, "rows": part.rows})
        state.part = None

    def _abort(self, *exc_info: Any) -> None:
        for state in self._splits.values():
            if state.part is not None:
                with contextlib.suppress(Exception):
                    state.part.writer.close()
                state.part.stack.__exit__(*(exc_info or sys.exc_info()))
                state.part = None
