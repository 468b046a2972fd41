"""Product ids on more than one row of a catalog: found once when scoring is planned, read by each shard.

The rule (docs/contracts.md, "Duplicate product_ids"). Ids are compared after
`pipeline.io.text.normalize_product_id` (decoded, trimmed), the one normalisation of ingest, scoring and
publish. When scored, a product_id on more than one row of the catalog snapshot is quarantined as
`duplicate_id` on every one of its rows: publish joins predictions to catalog rows by product_id, so scoring
one of the rows would give the others its attributes (a "Red Dress" row showing Navy/Skirt predicted from the
other row's image), and rows that differ have no prediction that is each row's own. Ingest, which builds
training examples rather than per-row attributes, keeps one row of each id (the smallest content hash,
queries/ingest_rank.sql) and quarantines the others under the same code.

Shards are scored independently and the rows of one id may lie in any files and shards, so the plan scans
the product_id column of the whole catalog once, batch by batch, into a local Parquet file that DuckDB groups
within a memory limit (memory bounded for any catalog size). The duplicated rows, each with its shard, go to
a side Parquet file next to the plan's outputs (`layout.duplicates_uri`), sorted by shard: a shard reads only
its own rows of it, and the plan itself (an Airflow XCom) carries just their count.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..io import storage
from ..io.catalog import CatalogError
from ..io.sql import load_sql, write_parquet
from ..io.text import normalize_product_ids

SCAN_ROWS = 65_536            # product_ids normalised per Arrow batch
DUCKDB_MEMORY = "1GB"         # the grouping spills to the temporary folder beyond this
KEY_FUNCTION = "cmaclip_product_id"
IDS_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("product_id", pa.large_string())])


def find(files: Sequence[tuple[str, str]], rows_per_shard: int, shard_format: str, uri: str | None) -> int:
    """Scan the product_id column of `files` ((uri, name) in plan order) and write every row whose id is on
    another row too (shard, file, row, product_id, detail) to `uri`; the number of those rows. `uri` None:
    count them only."""
    with tempfile.TemporaryDirectory(prefix="cmaclip-plan-") as tmp:
        ids = os.path.join(tmp, "ids.parquet")
        rows = _stage_ids(files, ids)
        con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY, "temp_directory": os.path.join(tmp, "spill")})
        try:
            params = {"ids": ids, "uris": [u for u, _ in files], "names": [n for _, n in files],
                      "starts": list(itertools.accumulate(rows[:-1], initial=0)), "rows_per_shard": rows_per_shard,
                      "shard_format": shard_format}
            reader = con.sql(load_sql("score_duplicates"), params=params).to_arrow_reader(SCAN_ROWS)
            return write_parquet(reader, uri) if uri else sum(batch.num_rows for batch in reader)
        finally:
            con.close()


def _stage_ids(files: Sequence[tuple[str, str]], path: str) -> list[int]:
    """(file index, row, normalised product_id) of every row with an id, to a local Parquet file; the rows
    of each file."""
    rows = []
    with pq.ParquetWriter(path, IDS_SCHEMA, compression="none") as writer:
        for index, (uri, _) in enumerate(files):
            start = 0
            try:
                for batch in storage.parquet_file(uri).iter_batches(batch_size=SCAN_ROWS, columns=["product_id"]):
                    writer.write_table(_ids_table(index, start, batch.column(0)))
                    start += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise CatalogError(uri, f"unreadable product_id column ({type(exc).__name__}: {exc})") from exc
            rows.append(start)
    return rows


def _ids_table(file: int, start: int, column: pa.Array) -> pa.Table:
    ids = normalize_product_ids(column)
    table = pa.table([pa.array(np.full(len(ids), file, np.int32)), pa.array(np.arange(start, start + len(ids))),
                      ids], schema=IDS_SCHEMA)
    return table.filter(pc.is_valid(ids))


def for_shard(uri: str, shard_id: str) -> dict[tuple[str, int], str]:
    """The shard's rows of the side file: (catalog file URI, 0-based row in that file) -> detail. Row-group
    statistics skip the other shards' rows."""
    fs, path = storage.filesystem(uri)
    dataset = pads.dataset(path, format="parquet", filesystem=storage.arrow_filesystem(fs))
    table = dataset.to_table(columns=["file", "row", "detail"], filter=pc.field("shard") == shard_id)
    files, rows, details = (table.column(c).to_pylist() for c in ("file", "row", "detail"))
    return {(f, r): d for f, r, d in zip(files, rows, details)}


def register_key(con: duckdb.DuckDBPyConnection, column_type: str) -> None:
    """`cmaclip_product_id(product_id)` in DuckDB SQL for a column of DuckDB type `column_type`: it runs
    `normalize_product_ids` itself, so publish keys a catalog row exactly as scoring keyed its prediction.
    (DuckDB's own `trim` removes spaces only, and reading bytes as text has no safe cast.)"""
    con.create_function(KEY_FUNCTION, normalize_product_ids, ["BLOB" if column_type == "BLOB" else "VARCHAR"],
                        "VARCHAR", type="arrow", null_handling="special")  # a blank id gives null
