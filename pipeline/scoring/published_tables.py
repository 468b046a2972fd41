"""The two tables publish writes, streamed within a fixed memory whatever the catalog's size: the new state
(`latest`: a run's predictions, one row per product, by product_id) and the catalog view (every catalog row
with its product's predictions, by the catalog's product_id).

DuckDB only reads: a scan streams, and its queries name and type the columns as publish always has. A sort,
a window or a join over the whole catalog in DuckDB holds the catalog in memory up to DuckDB's limit, and
below it, as much as it likes: publish's peak memory grew by 42% from 1x to 5x the catalog
(docs/benchmarks.md, "Scale"). Here the sorts are `ingest.external_sort`'s (runs of a fixed size on local
disk, merged a small batch of each at a time) and the join a merge of two streams sorted by the same key.
The report's fill and disagreements (`reviews`) are made of the same parts.

The catalog view's rule for duplicated ids (docs/contracts.md, "Duplicate product_ids"): a catalog row is
matched by its product_id normalised as scoring normalised the prediction's (`duplicate_ids.register_key`),
and an id on more than one row of the catalog gets null predictions on every one of its rows, whatever any
run predicted for it: no prediction is each row's own, and scoring quarantines these rows as
`duplicate_id`. Sorted by that key, the rows of one id are neighbours, so a row is duplicated exactly when
its key equals its predecessor's or its successor's.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ingest.external_sort import sorted_tables
from ..io import storage
from ..io.sql import load_sql
from .layout import ROW_GROUP_ROWS

# Columns of queries/publish_predictions.sql that order one product's predictions, oldest first.
NEWEST_LAST = ("__cmaclip_scored", "__cmaclip_scored_us", "__cmaclip_file", "__cmaclip_row")
# Columns of queries/publish_catalog_rows.sql: the row's key as scoring keys it ('' for none) and whether
# its product_id is null; and the row's position in the scan, which this module adds.
KEY, NO_ID, POSITION = "__cmaclip_key", "__cmaclip_no_id", "__cmaclip_position"
PREDICTED = "predicted_"                 # the state's columns in the view: never a catalog column's name
PREDICTED_KEY = PREDICTED + "product_id"
READ_BUFFER = 1 << 20                    # the state is read page by page through this buffer
RUN_BYTES = 4 << 20                      # rows sorted in memory at once: what the sorts hold is a few runs'
CHUNK_ROWS = 4_096                       # rows per table passed from step to step (the writer makes row groups)


def run_predictions(con: Any, files: Sequence[str]) -> pa.RecordBatchReader:
    """queries/publish_predictions.sql's rows of a run's prediction `files`, read one file at a time: DuckDB's
    scan of several files holds memory for each until the scan ends (about 3.5 MB a prediction file, measured
    on fashion-small), and a run has a file per shard, as many as the catalog has shards. Each file's rows
    get the types the files meet in (by name, as `union_by_name` reads them); a column a file lacks is null."""
    query = load_sql("publish_predictions")
    schema = con.sql(query, params={"predictions": list(files)}).limit(0).to_arrow_table().schema

    def batches() -> Iterator[pa.RecordBatch]:
        for file in files:
            for batch in con.sql(query, params={"predictions": [file]}).to_arrow_reader(ROW_GROUP_ROWS):
                yield pa.RecordBatch.from_arrays([batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                                                  else pa.nulls(batch.num_rows, f.type) for f in schema],
                                                 schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def latest(predictions: pa.RecordBatchReader, folder: str) -> pa.RecordBatchReader:
    """The new state from a run's predictions (`run_predictions`): sorted by product_id, one row per product
    (should a product have two predictions, the newest, as `NEWEST_LAST` orders them), the ordering columns
    dropped. `folder` (existing, local) takes the sorted runs."""
    keys = ["product_id", *NEWEST_LAST]
    runs = subfolder(folder, "latest")
    newest = _last_of_each(sorted_chunks(tables_of(predictions), keys, runs), "product_id")
    schema = _without(predictions.schema, NEWEST_LAST)
    return pa.RecordBatchReader.from_batches(schema, _batches(t.drop_columns(list(NEWEST_LAST)) for t in newest))


def predicted(latest: str) -> pa.RecordBatchReader:
    """The new state `latest` as the catalog view joins it: every column prefixed `predicted_`, so none
    collides with the catalog's own (which may hold human labels for the same tasks; a catalog column that
    is itself named like one is renamed by publish). In the file's order, by product_id, and with the types
    it was written with, which are the types DuckDB gives. Read with pyarrow: a DuckDB connection streams
    one result at a time, and the catalog's is open."""
    file = storage.parquet_file(latest, READ_BUFFER)
    schema = pa.schema([f.with_name(PREDICTED + f.name) for f in file.schema_arrow.remove_metadata()])
    batches = (b.rename_columns(schema.names) for b in file.iter_batches(ROW_GROUP_ROWS))
    return pa.RecordBatchReader.from_batches(schema, batches)


def catalog_view(catalog: pa.RecordBatchReader, state: pa.RecordBatchReader, names: Sequence[str],
                 folder: str) -> pa.RecordBatchReader:
    """The catalog view: queries/publish_catalog_rows.sql's rows (image bytes left out), each with the
    columns of its product's row of the state (`predicted`) but its key, null where the catalog duplicates
    the id or the state has none (products never scored, or quarantined); ordered by the catalog's
    product_id (nulls last, then scan order). `names`: the view's column names (the catalog's, then the
    state's), unique."""
    fields = _view_fields(catalog.schema, state.schema)
    if len(names) != len(fields):
        raise ValueError(f"catalog view: {len(names)} names for {len(fields)} columns")
    by_key = sorted_chunks(positioned(catalog), [KEY, POSITION], subfolder(folder, "by-key"))
    cursor = Cursor(state, PREDICTED_KEY)
    joined = (_joined(t, duplicated, cursor, names) for t, duplicated in with_duplicates(by_key, KEY))
    helpers = [NO_ID, POSITION]
    # Its own folder: this sort writes its runs while the sort by key still reads its own.
    ordered = sorted_chunks(joined, [NO_ID, "product_id", POSITION], subfolder(folder, "by-id"))
    schema = pa.schema([f.with_name(n) for f, n in zip(fields, names)])
    return pa.RecordBatchReader.from_batches(schema, _batches(t.drop_columns(helpers) for t in ordered))


# --- the state -------------------------------------------------------------------------------------------

def _last_of_each(tables: Iterable[pa.Table], key: str) -> Iterator[pa.Table]:
    """The last row of each run of equal `key`s of a sorted stream; a run may span tables."""
    pending = None
    for table in tables:
        if pending is not None:
            table = pa.concat_tables([pending, table])
        if not table.num_rows:
            continue
        ids = table.column(key)
        last = pc.not_equal(ids.slice(0, table.num_rows - 1), ids.slice(1))
        yield table.slice(0, table.num_rows - 1).filter(last)
        pending = table.slice(table.num_rows - 1)
    if pending is not None:
        yield pending


# --- the catalog view ------------------------------------------------------------------------------------

def positioned(catalog: pa.RecordBatchReader) -> Iterator[pa.Table]:
    """The catalog's rows with their position in the scan: what breaks ties between equal ids, so the view's
    order is the same every time."""
    start = 0
    for batch in catalog:
        n = batch.num_rows
        yield pa.Table.from_batches([batch]).append_column(POSITION, pa.array(np.arange(start, start + n)))
        start += n


def with_duplicates(tables: Iterable[pa.Table], key: str) -> Iterator[tuple[pa.Table, pa.Array]]:
    """Each table of a stream sorted by `key`, with the mask of its rows whose key is on another row too:
    the row before or after it, in this table or a neighbouring one."""
    before, current = None, None
    for table in tables:
        if not table.num_rows:
            continue
        if current is not None:
            yield current, _duplicated(current.column(key), before, table.column(key)[0])
            before = current.column(key)[-1]
        current = table
    if current is not None:
        yield current, _duplicated(current.column(key), before, None)


def _duplicated(keys: pa.ChunkedArray, before: pa.Scalar | None, after: pa.Scalar | None) -> pa.Array:
    values = keys.combine_chunks()
    edge = lambda scalar: pa.array([scalar.as_py() if scalar is not None else None], values.type)  # noqa: E731
    previous = pa.concat_arrays([edge(before), values.slice(0, len(values) - 1)])
    following = pa.concat_arrays([values.slice(1), edge(after)])
    return pc.or_(pc.equal(values, previous).fill_null(False), pc.equal(values, following).fill_null(False))


class Cursor:
    """The rows of a stream sorted by a unique `key`, read once in key order: `take(keys)` gives those whose
    key is among `keys` (sorted, not before any taken earlier) and passes over every row up to the last of
    them. It holds one batch of the stream and the rows it returns, however far apart the keys are."""

    def __init__(self, reader: pa.RecordBatchReader, key: str):
        self.batches, self.key, self.schema, self.ahead = iter(reader), key, reader.schema, None

    def take(self, keys: pa.ChunkedArray) -> pa.Table:
        last, found = keys[-1], []
        while True:
            if self.ahead is None:
                batch = next(self.batches, None)
                if batch is None:
                    break
                self.ahead = pa.Table.from_batches([batch])
            ids = self.ahead.column(self.key)
            upto = pc.sum(pc.less_equal(ids, last)).as_py() or 0  # a prefix: the stream is sorted
            passed = self.ahead.slice(0, upto)
            found.append(passed.filter(pc.is_in(passed.column(self.key), value_set=keys.combine_chunks())))
            if upto < self.ahead.num_rows:
                self.ahead = self.ahead.slice(upto)
                break
            self.ahead = None
        return pa.concat_tables(found) if found else self.schema.empty_table()


def _joined(table: pa.Table, duplicated: pa.Array, cursor: Cursor, names: Sequence[str]) -> pa.Table:
    """A sorted slice of the catalog with its products' rows of the state (nulls where none or duplicated),
    named `names`, and the helper columns the view is ordered by."""
    keys = table.column(KEY)
    found = cursor.take(keys)
    index = pc.index_in(keys, value_set=found.column(PREDICTED_KEY))
    index = pc.if_else(duplicated, pa.scalar(None, index.type), index)
    predicted = found.drop_columns([PREDICTED_KEY]).take(index)
    data = table.drop_columns([KEY, NO_ID, POSITION])
    columns = [*data.columns, *predicted.columns, table.column(NO_ID), table.column(POSITION)]
    return pa.Table.from_arrays(columns, names=[*names, NO_ID, POSITION])


def column_names(catalog: pa.Schema, state: pa.Schema) -> list[str]:
    """The catalog view's columns, as the two queries name them: the catalog's, then the state's."""
    return [f.name for f in _view_fields(catalog, state)]


def _view_fields(catalog: pa.Schema, state: pa.Schema) -> list[pa.Field]:
    return [f for f in catalog if f.name not in (KEY, NO_ID)] + [f for f in state if f.name != PREDICTED_KEY]


# --- streams ---------------------------------------------------------------------------------------------

def sorted_chunks(tables: Iterable[pa.Table], keys: Sequence[str], folder: str) -> Iterator[pa.Table]:
    return sorted_tables(tables, keys, folder, CHUNK_ROWS, RUN_BYTES)


def tables_of(reader: pa.RecordBatchReader) -> Iterator[pa.Table]:
    return (pa.Table.from_batches([batch]) for batch in reader)


def _batches(tables: Iterable[pa.Table]) -> Iterator[pa.RecordBatch]:
    for table in tables:
        yield from table.combine_chunks().to_batches()


def subfolder(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    return path


def _without(schema: pa.Schema, names: Sequence[str]) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in names])
