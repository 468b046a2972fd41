"""The report's two files for review (pipeline/scoring/report.py), streamed within a fixed memory whatever the
catalog's size, as publish streams its tables (`published_tables`): the run's predictions sorted by
product_id, the catalog's rows sorted by their scoring key and merge-joined with them, and the rows for
review sorted into their files' order.

- Fill: per task, the products whose catalog value is missing (no such column, null, or blank once cleaned)
  and that the run gives a label above the threshold. By task, most confident first.
- Disagreements: the products whose catalog value differs from such a label (likely catalog errors, or
  model errors), both values and the confidence; most confident first.

Values compare after cleaning (`pipeline.io.text.normalize_labels`), case-sensitively, as ingest reads
labels. An id on several catalog rows is left out, as the published catalog leaves it (duplicate_ids.py), and
so is a row without an id. Should the run hold two predictions of a product, the newest is reviewed (publish
refuses such a run). Columns: `pipeline.contracts.FILL`, `DISAGREEMENTS`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..contracts import DISAGREEMENTS, FILL, schema_of
from ..io import storage
from ..io.parquet_writer import AtomicParquetWriter
from ..io.sql import connect, load_sql
from ..io.text import normalize_labels
from . import duplicate_ids, published_tables as streams
from .layout import ROW_GROUP_ROWS

SCHEMAS = {"fill": schema_of(FILL), "disagreements": schema_of(DISAGREEMENTS)}   # the files, in sort order
# The one sort of the rows for review: fill's rows first, by (task, confidence descending, product_id), then
# disagreements', by (confidence descending, task, product_id).
ORDER = ("__cmaclip_review", "__cmaclip_task_first", "__cmaclip_less_confident", "task", "product_id")


def write(con: Any, predictions: Sequence[str], catalog: str, tasks: Sequence[str], uris: Mapping[str, str],
          folder: str) -> dict[str, dict[str, int]]:
    """Write the fill and disagreements files of a run's `predictions` against `catalog` to `uris` (by name);
    their rows per task, by name. `con`: a DuckDB connection that can read the catalog; `folder`: a local
    folder for the sorted runs."""
    if not tasks or not predictions:
        return _write_files(iter(()), uris)
    with connect() as own:  # a connection streams one result at a time: the predictions get their own
        storage.register_duckdb(own, predictions[0])
        state = streams.latest(streams.run_predictions(own, predictions), streams.subfolder(folder, "state"))
        rows = _catalog_labels(con, catalog, tasks).to_arrow_reader(ROW_GROUP_ROWS)
        by_key = streams.sorted_chunks(streams.positioned(rows), [streams.KEY, streams.POSITION],
                                       streams.subfolder(folder, "by-key"))
        cursor = streams.Cursor(state, "product_id")
        candidates = (_for_review(t, duplicated, cursor, tasks) for t, duplicated in streams.with_duplicates(
            by_key, streams.KEY))
        ordered = streams.sorted_chunks(candidates, ORDER, streams.subfolder(folder, "reviews"))
        return _write_files(ordered, uris)


def _catalog_labels(con: Any, catalog: str, tasks: Sequence[str]) -> Any:
    """The catalog's rows as (key, one value per task): the id keyed as scoring keys it ('' for none), the
    values cleaned as ingest cleans labels; null where the catalog has no such column, the cell is null or
    blank, or it is not text."""
    from duckdb import CoalesceOperator as coalesce, ColumnExpression as column, ConstantExpression as constant
    from duckdb import FunctionExpression as call

    files = storage.parquet_files(catalog)
    columns = con.sql(load_sql("publish_catalog_columns"), params={"catalog": files})
    types = {name: str(kind) for name, kind in zip(columns.columns, columns.types)}
    duplicate_ids.register_key(con, types.get("product_id", ""))
    con.create_function("cmaclip_label", normalize_labels, ["VARCHAR"], "VARCHAR", type="arrow",
                        null_handling="special")
    con.create_function("cmaclip_label_bytes", normalize_labels, ["BLOB"], "VARCHAR", type="arrow",
                        null_handling="special")

    def value(task: str) -> Any:
        if task not in types:
            return constant(None).cast("VARCHAR")
        if types[task] == "BLOB":
            return call("cmaclip_label_bytes", column(task))
        return call("cmaclip_label", column(task).cast("VARCHAR"))

    key = coalesce(call(duplicate_ids.KEY_FUNCTION, column("product_id")), constant(""))
    relation = con.read_parquet(files, union_by_name=True, hive_partitioning=False)
    return relation.select(key.alias(streams.KEY), *(value(t).alias(f"value_{i}") for i, t in enumerate(tasks)))


def _for_review(table: pa.Table, duplicated: pa.Array, cursor: streams.Cursor, tasks: Sequence[str]) -> pa.Table:
    """A sorted slice of the catalog's rows joined with the run's predictions: its rows for review, one per
    (product, task), with the columns they are ordered by."""
    keys = table.column(streams.KEY)
    found = cursor.take(keys)
    index = pc.index_in(keys, value_set=found.column("product_id"))
    index = pc.if_else(duplicated, pa.scalar(None, index.type), index)
    parts = []
    for i, task in enumerate(tasks):
        predicted = found.column(task).take(index)
        confidence = found.column(f"{task}_confidence").take(index)
        value = table.column(f"value_{i}")
        fill = pc.and_(pc.is_valid(predicted), pc.is_null(value))
        differs = pc.and_(pc.is_valid(predicted), pc.not_equal(value, predicted).fill_null(False))
        for review, chosen in enumerate((fill, differs)):
            rows = pa.table({"product_id": keys, "task": pa.repeat(task, len(keys)),
                             "catalog_value": value, "predicted": predicted, "confidence": confidence}).filter(chosen)
            parts.append(_ordered(rows, review))
    return pa.concat_tables(parts)


def _ordered(rows: pa.Table, review: int) -> pa.Table:
    n = rows.num_rows
    task_first = rows.column("task") if review == 0 else pa.repeat("", n)
    # Descending by negating; a null confidence last, as SQL's DESC puts nulls.
    less_confident = pc.negate(rows.column("confidence").cast(pa.float64())).fill_null(float("inf"))
    return rows.append_column(ORDER[0], pa.repeat(pa.scalar(review, pa.int8()), n)) \
        .append_column(ORDER[1], task_first).append_column(ORDER[2], less_confident)


def _write_files(ordered: Iterable[pa.Table], uris: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """The sorted rows for review into their two files (fill's first), in the contract's schemas."""
    counts: dict[str, dict[str, int]] = {name: {} for name in SCHEMAS}
    writers = {name: AtomicParquetWriter(uris[name], SCHEMAS[name], ROW_GROUP_ROWS) for name in SCHEMAS}
    try:
        for table in ordered:
            for review, name in enumerate(SCHEMAS):
                rows = table.filter(pc.equal(table.column(ORDER[0]), review)).select(SCHEMAS[name].names)
                if rows.num_rows:
                    writers[name].write(rows.cast(SCHEMAS[name]))
                    _count(counts[name], rows.column("task"))
    except BaseException as exc:
        for writer in writers.values():
            writer.abort(exc)
        raise
    for writer in writers.values():
        writer.close()
    return counts


def _count(counts: dict[str, int], tasks: pa.ChunkedArray) -> None:
    for row in pc.value_counts(tasks).to_pylist():
        counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
