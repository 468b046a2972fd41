"""Load the SQL files in `pipeline/io/queries/` (package data) by name, and stream a query's result into
Parquet. One statement per file; values are always bound as `$name` parameters, never formatted into the
text."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from .parquet_writer import AtomicParquetWriter

SQL_DIR = Path(__file__).resolve().parent / "queries"
MEMORY_LIMIT = "1GB"    # a query over a whole catalog spills to a temporary folder beyond this


@lru_cache(maxsize=None)
def load_sql(name: str) -> str:
    """The text of `queries/<name>.sql` (the `.sql` suffix is optional)."""
    path = SQL_DIR / (name if name.endswith(".sql") else f"{name}.sql")
    if not path.is_file():
        known = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
        raise FileNotFoundError(f"no SQL file {path.name!r} in {SQL_DIR}; known: {known}")
    return path.read_text(encoding="utf-8")


def memory_limit() -> str:
    """What one DuckDB connection may hold before it spills (`CMACLIP_DUCKDB_MEMORY`, default 1GB)."""
    return os.environ.get("CMACLIP_DUCKDB_MEMORY") or MEMORY_LIMIT


def scratch_root() -> str:
    """Where local scratch goes (DuckDB spills, ingest's sorted runs): `CMACLIP_SCRATCH_DIR`, default the
    system's temporary folder. Put it on a disk with room for a catalog's worth of rows."""
    return os.environ.get("CMACLIP_SCRATCH_DIR") or tempfile.gettempdir()


@contextlib.contextmanager
def connect(spill_dir: str | None = None, limit: str | None = None) -> Iterator[Any]:
    """A DuckDB connection within `limit` (default `memory_limit()`) whose sorts, joins and groupings spill
    to `spill_dir` beyond it, so memory stays bounded for any catalog size. Without `spill_dir`, a temporary
    folder under `scratch_root()`, removed after; the connection is closed after."""
    import duckdb

    with contextlib.ExitStack() as stack:
        if spill_dir is None:
            spill_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cmaclip-duckdb-", dir=scratch_root()))
        con = duckdb.connect(config={"memory_limit": limit or memory_limit(), "temp_directory": spill_dir})
        stack.callback(con.close)
        yield con


def write_parquet(reader: pa.RecordBatchReader, uri: str, metadata: dict[str, str] | None = None,
                  row_group_rows: int | None = None) -> int:
    """Stream a query's result into a Parquet file committed atomically, with `metadata` in its schema; its
    row count. One row group per batch (`relation.to_arrow_reader(rows)`), or of `row_group_rows` rows."""
    schema = reader.schema.with_metadata(metadata) if metadata else reader.schema
    with AtomicParquetWriter(uri, schema, row_group_rows) as writer:
        for batch in reader:
            writer.write(batch)
    return writer.rows
