"""The plan's one pass over a catalog: (file, row, normalised product_id, content hash) of every row that has an
id, staged batch by batch into a local Parquet file, and a DuckDB connection with a memory limit to query it.
`duplicate_ids` finds the ids on several rows there, `carry_over` the rows whose prediction is carried over.

Memory is bounded for any catalog size: rows are staged one Arrow batch at a time, and DuckDB groups and joins
within `sql.memory_limit()`, spilling to the scan's temporary folder beyond it. The content hash
(pipeline.io.content_hash) is computed only when asked for, and only an `image` column can give it: reading
every image is most of the pass, so a plan that carries nothing over reads the product_id column alone.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import storage
from ..io.catalog import CatalogError
from ..io.content_hash import content_hashes
from ..io.sql import connect, scratch_root
from ..io.text import normalize_product_ids

SCAN_ROWS = 8_192             # rows per Arrow batch when only product_ids are read: a constant, not a file's worth
HASH_ROWS = 1_024             # rows per Arrow batch when images are read too: they are most of a batch
READ_BUFFER = 1 << 20         # columns are read page by page through this buffer, not every row group's at once
ROWS_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("product_id", pa.large_string()),
                         ("content_hash", pa.string())])


@dataclass(frozen=True)
class Scan:
    """The staged rows of a catalog and a connection to query them. `params`: what every query of the plan's
    side files takes (queries/score_duplicates.sql says what each means); `names`: the files' names."""
    con: duckdb.DuckDBPyConnection
    params: dict[str, Any]
    names: list[str]


@contextmanager
def scan(files: Sequence[tuple[str, str]], rows_per_shard: int, shard_format: str,
         image_column: str | None = None) -> Iterator[Scan]:
    """Stage the rows of `files` ((uri, name) in plan order), hashing each row's title and `image_column`
    when given (else `content_hash` is null), and open DuckDB over them; both are gone after the block."""
    with tempfile.TemporaryDirectory(prefix="cmaclip-plan-", dir=scratch_root()) as tmp:
        path = os.path.join(tmp, "rows.parquet")
        rows = _stage(files, path, image_column)
        with connect(os.path.join(tmp, "spill")) as con:
            yield Scan(con, {"ids": path, "uris": [u for u, _ in files],
                             "starts": list(itertools.accumulate(rows[:-1], initial=0)),
                             "rows_per_shard": rows_per_shard, "shard_format": shard_format}, [n for _, n in files])


def _stage(files: Sequence[tuple[str, str]], path: str, image_column: str | None) -> list[int]:
    """Every row with an id, to a local Parquet file in ROWS_SCHEMA; the rows of each file."""
    columns = ["product_id"] + (["title", image_column] if image_column else [])
    batch_rows = HASH_ROWS if image_column else SCAN_ROWS
    rows = []
    with pq.ParquetWriter(path, ROWS_SCHEMA, compression="none") as out:
        for index, (uri, _) in enumerate(files):
            start = 0
            try:
                for batch in storage.parquet_file(uri, READ_BUFFER).iter_batches(batch_size=batch_rows, columns=columns):
                    out.write_table(_rows_table(index, start, batch))
                    start += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise CatalogError(uri, f"unreadable {'/'.join(columns)} column ({type(exc).__name__}: {exc})") from exc
            rows.append(start)
    return rows


def _rows_table(file: int, start: int, batch: pa.RecordBatch) -> pa.Table:
    ids, n = normalize_product_ids(batch.column(0)), batch.num_rows
    hashes = content_hashes(batch.column(1), batch.column(2)) if batch.num_columns == 3 else pa.nulls(n, pa.string())
    table = pa.table([pa.array(np.full(n, file, np.int32)), pa.array(np.arange(start, start + n)), ids, hashes],
                     schema=ROWS_SCHEMA)
    return table.filter(pc.is_valid(ids))
