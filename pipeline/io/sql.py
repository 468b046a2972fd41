"""Load the SQL files in `pipeline/queries/` (package data) by name, and stream a query's result into
Parquet. One statement per file; values are always bound as `$name` parameters, never formatted into the
text."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

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
    rows = 0
    with storage.atomic_output(uri) as sink, pq.ParquetWriter(sink, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows
