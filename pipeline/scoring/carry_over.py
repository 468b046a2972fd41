"""Incremental scoring: the catalog rows whose prediction is carried over from the published state instead of
being scored again. Found once when scoring is planned (a side file per plan), applied by each shard.

The rule. A row's prediction is carried over when the published state (`layout.published_uri(out, "latest")`,
one row per product) holds a prediction for its product_id that
- the model of this run made (same name and version: a new version rescores everything),
- was made from the same content (`content_hash`: the title and image bytes, pipeline.io.content_hash),
- has every column this run writes (an `explain` run carries only rows that have their contributions),
and no other catalog row has its id (a duplicated id is quarantined, never carried). Every other row is scored:
a new product, a changed title or image, a new model. A carried row goes into the run's predictions as the
state holds it, lineage included (its `run_id` and `scored_at` say which run scored it), so a run's
predictions cover the whole catalog and equal a full rescore with the same model, which would read the same
inputs. `full` (CLI `--full`, DAG param) plans without a state: nothing is carried.

Where it is decided. With an `image` column the plan hashes every row (`catalog_scan`) and DuckDB joins them
with the state (queries/score_carry.sql): the side file holds exactly the rows to carry, and the plan's count
per shard is exact. An `image_uri` catalog's content lies behind URIs that only the shards fetch (under the
catalog's policy, pipeline.io.image_sources); there the side file holds the candidates (same id, same model)
with the state's hash, and a shard carries a candidate when its title and fetched content hash the same, and
scores it otherwise: the plan's count is an upper bound (`decided_at_plan`). Either way the shard hashes what
it read and compares (for an `image` column a check, one hash per row, far below a decode): one code path.

The side file depends on the state and the model, so both are part of the plan's identity (`Source.key`): a
new published state or model version makes another plan, and so another run.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..contracts import CONTENT_HASH, CONTRIBUTIONS, prediction_columns
from ..io import storage
from ..io.sql import load_sql, write_parquet
from .catalog_scan import SCAN_ROWS, Scan
from .layout import published_uri

log = logging.getLogger(__name__)
PLACE = ("shard", "file", "row")  # where a carried row is in the catalog; the state's columns follow


@dataclass(frozen=True)
class Source:
    """The published state a plan carries predictions over from, and which of its rows qualify."""
    uri: str
    version: str                  # storage.content_version of the state
    model_name: str
    model_version: str
    columns: tuple[str, ...]      # the prediction columns this run writes: a carried row has them all
    required: tuple[str, ...]     # those that may not be null: the content hash, with explain the contributions

    def key(self) -> tuple:
        """What the carried rows depend on besides the catalog: part of the plan's id."""
        return self.version, self.model_name, self.model_version, self.columns, self.required


def source(out: str, model_name: str, model_version: str, tasks: Sequence[str],
           explain: bool = False) -> Source | None:
    """What a plan scoring into `out` with this model may carry over: the published state, when it holds
    predictions of this model with every column the run writes; else None, and everything is scored."""
    state = published_uri(out, "latest")
    if not storage.exists(state):
        return None
    columns = tuple(c.name for c in prediction_columns(tasks, explain))
    missing = sorted(set(columns) - set(storage.parquet_file(state).schema_arrow.names))
    if missing:  # a state from before content hashes, or without the contributions an explain run writes
        log.info("%s has no column %s: nothing is carried over", state, ", ".join(missing))
        return None
    by_model = (pc.field("model_name") == model_name) & (pc.field("model_version") == model_version)
    if not storage.open_parquet_dataset(state).count_rows(filter=by_model):
        log.info("%s holds no prediction of %s:%s: nothing is carried over", state, model_name, model_version)
        return None
    contributions = [c.named(t) for t in tasks for c in CONTRIBUTIONS.values()] if explain else []
    return Source(state, storage.content_version(state), model_name, model_version, columns,
                  (CONTENT_HASH.name, *contributions))


def decided_at_plan(image_column: str) -> bool:
    """Whether the plan sees a row's content: an `image` column, yes; `image_uri`, only the shard that fetches it."""
    return image_column == "image"


def find(scan: Scan, carry_from: Source, at_plan: bool, uri: str) -> dict[str, int]:
    """The staged rows to carry over (`at_plan`) or their candidates, each with its place and the state's
    columns, written to `uri` sorted by shard; the rows per shard."""
    storage.register_duckdb(scan.con, carry_from.uri)
    params = {**scan.params, "state": carry_from.uri, "model_name": carry_from.model_name,
              "model_version": carry_from.model_version, "columns": list(carry_from.columns),
              "required": list(carry_from.required), "at_read": not at_plan}
    reader = scan.con.sql(load_sql("score_carry"), params=params).to_arrow_reader(SCAN_ROWS)
    counts: Counter[str] = Counter()
    write_parquet(pa.RecordBatchReader.from_batches(reader.schema, _counted(reader, counts)), uri)
    return dict(counts)


def _counted(batches: Iterator[pa.RecordBatch], counts: Counter) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for item in pc.value_counts(batch.column("shard")).to_pylist():
            counts[item["values"]] += item["counts"]
        yield batch


def counts(uri: str) -> dict[str, int]:
    """The rows per shard of a side file written before (a plan made again)."""
    found: Counter[str] = Counter()
    for _ in _counted(storage.parquet_file(uri).iter_batches(SCAN_ROWS, columns=["shard"]), found):
        pass
    return dict(found)


@dataclass(frozen=True)
class ShardCarry:
    """A shard's rows of the side file: the state's hash at each place, and the state's rows to write."""
    hashes: dict[tuple[str, int], str]    # (catalog file URI, 0-based row in it) -> the state's content hash
    rows: pa.Table                        # the state's prediction columns
    index: dict[str, int]                 # product_id -> its row in `rows`

    def take(self, product_ids: Sequence[str]) -> pa.Table:
        return self.rows.take(pa.array([self.index[p] for p in product_ids], pa.int64()))


NOTHING = ShardCarry({}, pa.table({}), {})


def for_shard(uri: str, shard_id: str) -> ShardCarry:
    """The shard's rows of the side file (row-group statistics skip the other shards')."""
    fs, path = storage.filesystem(uri)
    dataset = pads.dataset(path, format="parquet", filesystem=storage.arrow_filesystem(fs))
    table = dataset.to_table(filter=pc.field("shard") == shard_id)
    places = zip(table.column("file").to_pylist(), table.column("row").to_pylist(),
                 table.column(CONTENT_HASH.name).to_pylist())
    rows = table.drop_columns(list(PLACE))
    return ShardCarry({(f, r): h for f, r, h in places}, rows,
                      {p: i for i, p in enumerate(rows.column("product_id").to_pylist())})
