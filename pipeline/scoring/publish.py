"""Publish from every finalized run under `out`: the latest prediction per product, and the catalog joined
with its predicted attributes. Only runs with a manifest count: a half-scored run never leaks."""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from ..io import storage
from ..io.sql import load_sql, write_parquet
from . import duplicate_ids
from .finalize import read_run_manifests
from .layout import published_uri
from .writer import ROW_GROUP_ROWS

CATALOG_PREFIX = "catalog_"        # a catalog column named like a prediction column gets this prefix


def _query(con: Any, name: str, params: dict[str, Any]) -> pa.RecordBatchReader:
    return con.sql(load_sql(name), params=params).to_arrow_reader(ROW_GROUP_ROWS)


def publish(out: str, catalog: str | None = None) -> dict[str, Any]:
    """From every finalized run under `out`: the latest prediction per product (`published/latest.parquet`)
    and, given the catalog, the catalog joined with its predicted attributes (`published/catalog.parquet`).
    Only runs with a manifest count: a half-scored run never leaks into what is published."""
    import duckdb

    manifests = read_run_manifests(out)
    files = sorted(f for m in manifests for f in m.predictions)
    if not files:
        raise FileNotFoundError(f"no finalized scoring run under {out}: run score and finalize first")
    con = duckdb.connect()
    storage.register_duckdb(con, out)
    latest = published_uri(out, "latest")
    summary = {"runs": sorted(m.run_id for m in manifests), "files": len(files), "latest": latest,
               "products": write_parquet(_query(con, "publish_latest", {"predictions": files}), latest)}
    if catalog is not None:
        summary.update(_publish_catalog(con, catalog, latest, published_uri(out, "catalog")))
    return summary


def _publish_catalog(con: Any, catalog: str, latest: str, view: str) -> dict[str, Any]:
    """queries/publish_catalog_view.sql, with catalog rows keyed by the scoring rule (`duplicate_ids.register_key`)
    and catalog columns named like a prediction column renamed (`_unique_columns`)."""
    storage.register_duckdb(con, catalog)
    files = storage.parquet_files(catalog)
    columns = con.sql(load_sql("publish_catalog_columns"), params={"catalog": files})
    duplicate_ids.register_key(con, str(dict(zip(columns.columns, columns.types)).get("product_id", "")))
    reader, renamed = _unique_columns(_query(con, "publish_catalog_view", {"catalog": files, "latest": [latest]}))
    if renamed:
        logging.getLogger(__name__).warning("publish: catalog columns %s are named like prediction columns; "
                                            "published as %s", sorted(renamed), sorted(renamed.values()))
    return {"catalog": view, "catalog_rows": write_parquet(reader, view), "renamed": renamed}


def _unique_columns(reader: pa.RecordBatchReader) -> tuple[pa.RecordBatchReader, dict[str, str]]:
    """The catalog view has the catalog's columns first, then the `predicted_` ones. A catalog column with a
    prediction column's name (say, the catalog keeps predictions of its own) would make two columns of one
    name, a file no reader accepts: it is published as `catalog_<name>` (prefixed again while taken)."""
    names = reader.schema.names
    unique, taken, renamed = list(names), set(names), {}
    for i, name in enumerate(names):
        if name in names[i + 1:]:
            alias = CATALOG_PREFIX + name
            while alias in taken:
                alias = CATALOG_PREFIX + alias
            unique[i], renamed[name] = alias, alias
            taken.add(alias)
    if not renamed:
        return reader, {}
    schema = pa.schema([field.with_name(name) for field, name in zip(reader.schema, unique)])
    return pa.RecordBatchReader.from_batches(schema, (b.rename_columns(unique) for b in reader)), renamed
