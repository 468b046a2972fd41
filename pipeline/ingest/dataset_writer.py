"""Write a split-partitioned Parquet dataset in rolling parts, each committed atomically when complete.

Rows are written in row groups of a fixed size (`io.parquet_writer`), because the row group is the unit the
loader shuffles and shards across workers and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pyarrow as pa

from ..io import storage
from ..io.parquet_writer import AtomicParquetWriter


@dataclass
class _Split:
    part: AtomicParquetWriter | None = None
    name: str = ""                      # the open part's file name
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
        if exc is None:
            self.close()
        else:
            self._abort(exc)

    def write(self, split: str, table: pa.Table) -> None:
        state = self._splits.setdefault(split, _Split())
        while table.num_rows:
            if state.part is None:
                self._open(split, state)
            room = self.rows_per_part - state.part.rows
            state.part.write(table.slice(0, room))
            table = table.slice(room)
            if state.part.rows == self.rows_per_part:
                self._commit(split, state)

    def close(self) -> None:
        for split, state in self._splits.items():
            if state.part is not None:
                self._commit(split, state)

    def _open(self, split: str, state: _Split) -> None:
        state.name = f"part-{split}-{state.count:05d}.parquet"
        state.count += 1
        state.part = AtomicParquetWriter(storage.join(self.folder_uri, state.name), self.schema,
                                         self.row_group_rows)

    def _commit(self, split: str, state: _Split) -> None:
        state.part.close()  # rename / upload happens here
        self.files.setdefault(split, []).append({"path": state.name, "rows": state.part.rows})
        state.part = None

    def _abort(self, exc: BaseException) -> None:
        for state in self._splits.values():
            if state.part is not None:
                state.part.abort(exc)
                state.part = None
