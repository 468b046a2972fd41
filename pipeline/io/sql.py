"""Load the SQL files in `pipeline/io/queries/` (package data) by name, and stream a query's result into
Parquet. One statement per file; values are always bound as `$name` parameters, never formatted into the
text."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from .parquet_writer import AtomicParquetWriter

SQL_DIR = Path(__file__).resolve().parent / "queries"


@lru_cache(maxsize=None)
def load_sql(name: str) -> str:
    """The text of `queries/<name>.sql` (the `.sql` suffix is optional)."""
    path = SQL_DIR / (name if name.endswith(".sql") else f"{name}.sql")
    if not path.is_file():
        known = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
        raise FileNotFoundError(f"no SQL file {path.name!r} in {SQL_DIR}; known: {known}")
    return path.read_text(encoding="utf-8")


def write_parquet(reader: pa.RecordBatchReader, uri: str) -> int:
    """Stream a query's result (`relation.to_arrow_reader(rows)`: one row group per batch) into a Parquet
    file committed atomically; its row count."""
    with AtomicParquetWriter(uri, reader.schema) as writer:
        for batch in reader:
            writer.write(batch)
    return writer.rows
