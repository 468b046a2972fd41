"""Product ids on more than one row of a catalog: found once when scoring is planned, read by each shard.

The rule (docs/contracts.md, "Duplicate product_ids"). Ids are compared after
`pipeline.io.text.normalize_product_id` (decoded, trimmed), the one normalisation of ingest, scoring and
publish. When scored, a product_id on more than one row of the catalog snapshot is quarantined as
`duplicate_id` on every one of its rows: publish joins predictions to catalog rows by product_id, so scoring
one of the rows would give the others its attributes (a "Red Dress" row showing Navy/Skirt predicted from the
other row's image), and rows that differ have no prediction that is each row's own. Ingest, which builds
training examples rather than per-row attributes, keeps one row of each id (the smallest content hash,
pipeline.ingest.decide) and quarantines the others under the same code.

Shards are scored independently and the rows of one id may lie in any files and shards, so the plan looks
at the product_id of every row, staged once for the whole plan (`catalog_scan`, memory bounded for any catalog
size). The duplicated rows, each with its shard, go to a side Parquet file next to the plan's outputs
(`layout.duplicates_uri`), sorted by shard: a shard reads only its own rows of it, and the plan itself (an
Airflow XCom) carries just their count.
"""
from __future__ import annotations

import duckdb
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..io import storage
from ..io.sql import load_sql, write_parquet
from ..io.text import normalize_product_ids
from .catalog_scan import SCAN_ROWS, Scan

KEY_FUNCTION = "cmaclip_product_id"


def find(scan: Scan, uri: str | None) -> int:
    """Every staged row whose id is on another row too (shard, file, row, product_id, detail), written to
    `uri`; the number of those rows. `uri` None: count them only."""
    params = {**scan.params, "names": scan.names}
    reader = scan.con.sql(load_sql("score_duplicates"), params=params).to_arrow_reader(SCAN_ROWS)
    return write_parquet(reader, uri) if uri else sum(batch.num_rows for batch in reader)


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
