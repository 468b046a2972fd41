"""Sharded batch scoring: plan shards -> score each shard (idempotent, atomic, done marker) -> finalize ->
publish. The img2dataset pattern: a shard's output path is a function of (input snapshot, shard id, model
version); outputs are committed by rename (or a single object put) and a done marker with the row counts is
written last, so a rerun skips committed shards and redoes the rest, in any order, on any worker.

Layout under `out` (Hive-style partitions, readable by pyarrow.dataset, DuckDB and Spark):

    predictions/model=<name>/version=<v>/run=<id>/shard-<id>.parquet
    quarantine/model=<name>/version=<v>/run=<id>/shard-<id>.parquet   (only shards that quarantined rows)
    _markers/run=<id>/shard-<id>.json                                  (done markers, written last)
    _manifests/run=<id>.json                                           (finalize: the run is complete)
    _plans/plan=<id>/duplicates.parquet                                (plan: rows of duplicated product_ids)
    published/latest.parquet, published/catalog.parquet                (publish)

Speed: the main thread only runs the forward pass; DataLoader workers read the shard's Parquet row groups,
decode and preprocess images and tokenize titles ahead of it, where there is a core the forward pass does
not use (see `default_workers`). Memory: a shard is streamed batch by batch
and predictions are flushed every `ROW_GROUP_ROWS` rows, so peak memory does not depend on catalog size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import catalog as catalog_files
from . import duplicate_ids, reasons, storage
from .contracts import CONTRACT, KEY, QUARANTINE_SCHEMA, lineage_values, prediction_schema, quarantine_table
from .image_sources import ImageSources, fetch_images, for_catalog
from .manifests import RunManifest, ShardLineage, ShardMarker, ShardTimings
from .predictor import Predictor, Preprocessor, check_product_id, decode_rows
from .sql import load_sql, write_parquet

METADATA_KEY = b"cmaclip"          # Parquet key-value metadata: schema + model lineage as JSON
ROW_GROUP_ROWS = 16_384            # predictions buffered per Parquet row group
READ_BUFFER = 1 << 20             # Parquet pages are read through this buffer, not whole column chunks
PREFETCH_BATCHES = 4               # per worker: enough to hide a slow image, little memory
SOURCE_FILE = "_catalog_file"      # raw_batches: the catalog file each row came from
DUPLICATE = "_duplicate_id"        # raw_batches: why the row is quarantined as duplicate_id (null: it is not)
SHARD_ID = "{:05d}"                # a shard's id: its index in plan order (queries/score_duplicates.sql uses it too)
CATALOG_PREFIX = "catalog_"        # publish: a catalog column named like a prediction column gets this prefix
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- plan -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one file."""
    file: str
    row_group: int
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """What one task scores. Self-contained and small, so Airflow can map over `plan.shards` as JSON."""
    id: str
    plan_id: str
    input_fingerprint: str
    image_column: str
    pieces: tuple[Piece, ...]
    sources: ImageSources
    duplicates: int                  # the plan's rows of duplicated ids (any shard): nonzero, read its own

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sources": self.sources.as_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Shard":
        return cls(d["id"], d["plan_id"], d["input_fingerprint"], d["image_column"],
                   tuple(Piece(**p) for p in d["pieces"]), ImageSources.from_dict(d["sources"]), d["duplicates"])


@dataclass(frozen=True)
class CatalogLayout:
    uri: str
    image_column: str
    row_groups: tuple[int, ...]   # rows per row group


@dataclass(frozen=True)
class Plan:
    """The shards of one input snapshot. Stores the file layout, not the shards: shards are derived from
    it, which keeps the JSON small (one line per file) however many shards there are."""
    catalog: str
    fingerprint: str
    rows_per_shard: int
    files: tuple[CatalogLayout, ...]
    sources: ImageSources            # what `image_uri` rows may read (pipeline.image_sources)
    duplicates: int = 0              # rows whose product_id is on another row too (pipeline.duplicate_ids)

    @property
    def id(self) -> str:
        return _digest(self.fingerprint, self.rows_per_shard)[:16]

    @property
    def rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)

    @functools.cached_property
    def _by_id(self) -> dict[str, Shard]:
        return {s.id: s for s in _cut(self)}

    @property
    def shards(self) -> list[Shard]:
        return list(self._by_id.values())

    @property
    def shard_ids(self) -> list[str]:
        return list(self._by_id)

    def shard(self, shard_id: str) -> Shard:
        if shard_id not in self._by_id:  # a user's --shard: a plain error, not a lookup traceback
            ids = self.shard_ids
            raise ValueError(f"no shard {shard_id!r} in plan {self.id}: its {len(ids)} shards of "
                             f"{self.rows_per_shard} rows are {ids[0]}..{ids[-1]}")
        return self._by_id[shard_id]

    def to_dict(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "fingerprint": self.fingerprint, "rows_per_shard": self.rows_per_shard,
                "files": [[f.uri, f.image_column, list(f.row_groups)] for f in self.files],
                "sources": self.sources.as_dict(), "duplicates": self.duplicates, "plan_id": self.id,
                "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        files = tuple(CatalogLayout(uri, column, tuple(groups)) for uri, column, groups in d["files"])
        return cls(d["catalog"], d["fingerprint"], int(d["rows_per_shard"]), files,
                   ImageSources.from_dict(d["sources"]), int(d["duplicates"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def plan_shards(catalog: str, rows_per_shard: int = 10_000, image_roots: list[str] | None = None,
                image_hosts: list[str] | None = None, out: str | None = None) -> Plan:
    """Cut the catalog into shards of `rows_per_shard` rows (the last may be shorter), following file and
    row-group order. Deterministic: the same files give the same plan, shard ids and fingerprint. Reads
    footers, content versions and the product_id column (to find duplicated ids); a file-level problem raises
    `catalog.CatalogError` here, before any shard runs. `image_roots`, `image_hosts`: what `image_uri` rows
    may read besides the catalog's own folder (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`).
    `out`: the scoring output, where the rows of duplicated ids are written for the shards to read; a
    catalog with such rows cannot be scored from a plan made without it."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    scanned = catalog_files.scan(catalog, tasks=())
    layouts = []
    for f in scanned:
        meta = storage.parquet_file(f.uri).metadata
        layouts.append(CatalogLayout(f.uri, f.image_column,
                                     tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    if len({f.image_column for f in layouts}) > 1:
        # A batch may span files, and one batch has one image column.
        raise catalog_files.CatalogError(catalog, "some files have 'image' and others 'image_uri'; use one")
    plan = Plan(catalog, catalog_files.fingerprint(scanned), rows_per_shard, tuple(layouts),
                for_catalog(catalog, image_roots, image_hosts))
    return dataclasses.replace(plan, duplicates=_find_duplicates(plan, [f.name for f in scanned], out))


def duplicates_uri(out: str, plan_id: str) -> str:
    return storage.join(out, "_plans", f"plan={plan_id}", "duplicates.parquet")


def _find_duplicates(plan: Plan, names: list[str], out: str | None) -> int:
    """The rows of duplicated product_ids, written under `out` for the shards; a plan whose rows are already
    written there (same snapshot, same shards) is not scanned again."""
    target = duplicates_uri(out, plan.id) if out is not None else None
    if target is not None and storage.exists(target):
        return _parquet_rows(target)
    files = [(f.uri, name) for f, name in zip(plan.files, names)]
    return duplicate_ids.find(files, plan.rows_per_shard, SHARD_ID, target)


def _piece_groups(plan: Plan) -> Iterator[list[Piece]]:
    """Consecutive row ranges, `rows_per_shard` rows per group, in file and row-group order."""
    pieces, taken = [], 0
    for f in plan.files:
        for group, rows in enumerate(f.row_groups):
            start = 0
            while start < rows:
                stop = min(rows, start + plan.rows_per_shard - taken)
                pieces.append(Piece(f.uri, group, start, stop))
                taken, start = taken + stop - start, stop
                if taken == plan.rows_per_shard:
                    yield pieces
                    pieces, taken = [], 0
    if pieces:
        yield pieces


def _cut(plan: Plan) -> Iterator[Shard]:
    column = plan.files[0].image_column if plan.files else "image"
    for index, pieces in enumerate(_piece_groups(plan)):
        yield Shard(SHARD_ID.format(index), plan.id, plan.fingerprint, column, tuple(pieces), plan.sources,
                    plan.duplicates)


# --- model reference --------------------------------------------------------------------------------

def load_predictor(model: Any, *, precision: str = "auto", device: str = "cpu", compile: bool = False) -> Predictor:
    """A Predictor from a model reference: an object with `.predictor()` (a Predictor is one), or a local
    checkpoint folder, or a registry or run URI (`models:/name@alias`, `models:/name/3`, `runs:/id/path`)."""
    if hasattr(model, "predictor"):
        return model.predictor()
    ref = str(model)
    if ref.startswith(("models:/", "runs:/")):
        from . import registry  # MLflow is imported only when a registry reference is scored

        return registry.load_predictor(ref, precision=precision, device=device, compile=compile)
    if "://" in ref and not ref.startswith("file://"):
        raise ValueError(f"model {ref!r}: only local checkpoint folders are supported; fetch it first")
    path = Path(ref.removeprefix("file://"))
    if not (path / "cmaclip.json").is_file():
        raise FileNotFoundError(f"model {ref!r} is not a cmaclip checkpoint folder (no cmaclip.json)")
    return Predictor.from_checkpoint(path, precision=precision, device=device, compile=compile)


def default_run_id(plan_id: str, predictor: Predictor, explain: bool = False) -> str:
    """Same input snapshot + same model (+ same output columns) -> same run, so rerunning a command resumes
    it. `explain` adds columns, so it makes another run; off, it leaves the id as it was before it existed."""
    return _digest(plan_id, predictor.lineage.name, predictor.lineage.version, *(["explain"] if explain else []))[:16]


# --- output paths -----------------------------------------------------------------------------------

def _partition(name: str, version: str, run_id: str) -> str:
    # Hive escapes partition values the same way: '/' or '=' in a model name must not create folders.
    return f"model={quote(name, safe='-_.')}/version={quote(version, safe='-_.')}/run={run_id}"


def output_uris(out: str, shard_id: str, name: str, version: str, run_id: str) -> dict[str, str]:
    part, file = _partition(name, version, run_id), f"shard-{shard_id}.parquet"
    return {"predictions": storage.join(out, "predictions", part, file),
            "quarantine": storage.join(out, "quarantine", part, file),
            "marker": storage.join(out, "_markers", f"run={run_id}", f"shard-{shard_id}.json")}


def manifest_uri(out: str, run_id: str) -> str:
    return storage.join(out, "_manifests", f"run={run_id}.json")


def _check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (it becomes a path)")
    return run_id


# --- reading and preparing a shard --------------------------------------------------------------------

@dataclass
class PreparedBatch:
    """One batch of a shard, ready for the forward pass, plus the rows that could not be prepared."""
    index: int
    rows_in: int
    product_ids: list[str]
    pixels: torch.Tensor
    tokens: torch.Tensor
    quarantine: list[tuple]

    def pin_memory(self) -> "PreparedBatch":
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), tokens=self.tokens.pin_memory())


def batch_schema(image_column: str) -> pa.Schema:
    """One schema for every slice of a shard, whatever types its files use (a batch may span files). The
    files of one catalog may store text as string, large or view string, dictionary, binary or null, and
    `image` as binary or large binary: all are read as bytes, and text cells are decoded one by one
    (`pipeline.text`), so a cell that is not UTF-8 quarantines its row instead of failing the batch."""
    return pa.schema([("product_id", pa.large_binary()), ("title", pa.large_binary()),
                      (image_column, pa.large_binary()), (SOURCE_FILE, pa.string()), (DUPLICATE, pa.string())])


def _as_bytes(column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    # A cast copies the column, and the image column is most of a batch's memory: only when it must.
    return column if column.type == pa.large_binary() else column.cast(pa.large_binary())


def _canonical(batch: pa.RecordBatch, schema: pa.Schema, file: str, first_row: int,
               duplicates: dict[tuple[str, int], str]) -> pa.RecordBatch:
    """A slice of `file` starting at its row `first_row`, in `batch_schema`: the file of each row (relative
    image URIs start from there) and why it is a duplicate, if it is one."""
    n = batch.num_rows
    why = [duplicates.get((file, first_row + i)) for i in range(n)] if duplicates else [None] * n
    columns = [_as_bytes(batch.column(i)) for i in range(3)]
    columns += [pa.array([file] * n, pa.string()), pa.array(why, pa.string())]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def raw_batches(shard: Shard, batch_size: int,
                duplicates: dict[tuple[str, int], str] | None = None) -> Iterator[list[pa.RecordBatch]]:
    """The shard's rows as Arrow slices in `batch_schema`, `batch_size` rows per batch, in plan order. Reads
    one row group's column chunks at a time: memory is bounded by the row-group size. `duplicates`: the
    shard's rows of duplicated ids, (file, row) -> detail (`duplicate_ids.for_shard`)."""
    columns, schema = ["product_id", "title", shard.image_column], batch_schema(shard.image_column)
    pending, pending_rows, opened = [], 0, None
    for piece in shard.pieces:
        if opened is None or opened[0] != piece.file:
            opened = (piece.file, storage.parquet_file(piece.file, buffer_size=READ_BUFFER))
        meta = opened[1].metadata
        group_start = sum(meta.row_group(g).num_rows for g in range(piece.row_group))  # as a row of the file
        offset = 0
        for batch in opened[1].iter_batches(batch_size=batch_size, row_groups=[piece.row_group], columns=columns):
            batch = _canonical(batch, schema, piece.file, group_start + offset, duplicates or {})
            lo, hi = max(piece.start - offset, 0), min(piece.stop - offset, batch.num_rows)
            offset += batch.num_rows
            while lo < hi:  # cut into batches of exactly batch_size rows across piece boundaries
                take = min(hi - lo, batch_size - pending_rows)
                pending.append(batch.slice(lo, take))
                pending_rows, lo = pending_rows + take, lo + take
                if pending_rows == batch_size:
                    yield pending
                    pending, pending_rows = [], 0
            if offset >= piece.stop:
                break
    if pending:
        yield pending


def _keyed(table: pa.Table) -> tuple[pa.Table, list[tuple]]:
    """The rows with a product_id of their own, that id normalised; and the quarantine rows of the others
    (no id, or an id on other catalog rows too: the plan's list). Runs before any image is read."""
    keep, ids, quarantine = [], [], []
    flagged = table.column(DUPLICATE).to_pylist()
    for i, raw in enumerate(table.column("product_id").to_pylist()):
        product_id, refused = check_product_id(raw)
        if refused is None and flagged[i] is not None:
            refused = (product_id, "score", reasons.DUPLICATE_ID, flagged[i])
        if refused is None:
            keep.append(i)
            ids.append(product_id)
        else:
            quarantine.append(refused)
    if len(keep) < table.num_rows:  # a take copies every column, images included
        table = table.take(keep)
    return table.set_column(0, "product_id", pa.array(ids, pa.large_string())), quarantine


def _cells(column: pa.ChunkedArray) -> Iterator[Any]:
    """A column's values one at a time: an image's bytes live as a Python object only while it decodes."""
    for chunk in column.chunks:
        for i in range(len(chunk)):
            yield chunk[i].as_py()


def prepare_batch(index: int, slices: list[pa.RecordBatch], preprocessor: Preprocessor,
                  shard: Shard) -> PreparedBatch:
    """Decode, check and preprocess one batch; runs in a DataLoader worker."""
    table = pa.Table.from_batches(slices)
    rows_in = table.num_rows
    table, unkeyed = _keyed(table)
    ids, titles = table.column(0).to_pylist(), table.column(1).to_pylist()
    quarantine, images = [], _cells(table.column(2))
    if shard.image_column == "image_uri":
        images, failed = fetch_images(list(images), table.column(SOURCE_FILE).to_pylist(), shard.sources)
        quarantine = [(ids[i], "score", reason, why) for i, (reason, why) in failed.items()]
        keep = [i for i in range(len(ids)) if i not in failed]
        ids, titles, images = [ids[i] for i in keep], [titles[i] for i in keep], [images[i] for i in keep]
    good, bad = decode_rows(zip(ids, titles, images), draft=preprocessor.draft)
    return PreparedBatch(index, rows_in, good.product_ids, preprocessor.images(good.images),
                         preprocessor.texts(good.titles), unkeyed + quarantine + bad)


class ShardBatches(IterableDataset):
    """The prepared batches of one shard. With n workers, worker w prepares batches w, w+n, ...; the
    DataLoader takes them round-robin, so batches come out in shard order whatever the worker count."""

    def __init__(self, shard: Shard, preprocessor: Preprocessor, batch_size: int,
                 duplicates: dict[tuple[str, int], str]):
        self.shard, self.preprocessor, self.batch_size = shard, preprocessor, batch_size
        self.duplicates = duplicates

    def __iter__(self) -> Iterator[PreparedBatch]:
        info = get_worker_info()
        workers, me = (1, 0) if info is None else (info.num_workers, info.id)
        for index, slices in enumerate(raw_batches(self.shard, self.batch_size, self.duplicates)):
            if index % workers == me:  # every worker reads the (compressed) rows; each decodes only its own
                yield prepare_batch(index, slices, self.preprocessor, self.shard)


def _as_is(batch: PreparedBatch) -> PreparedBatch:
    return batch


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's or taskset's share, not the host's
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """Decode workers when the caller does not say. On a GPU the forward leaves the CPU free: up to 4.
    On a CPU, torch's intra-op threads already take every core, and a worker there only takes time from
    them: on 2 cores 1 worker ran the pipeline at 0.84-0.86 of the forward-only speed and decoding in turn
    at 0.89-0.96 (bench/scoring.py). So a worker only where a core is left over (e.g. `--threads` below the
    cores)."""
    cpus = available_cpus()
    if device.type == "cuda":
        return min(4, max(1, cpus - 1))
    return 1 if torch.get_num_threads() < cpus else 0


def batch_loader(shard: Shard, preprocessor: Preprocessor, batch_size: int, workers: int,
                 pin_memory: bool = False, duplicates: dict[tuple[str, int], str] | None = None) -> DataLoader:
    if workers and multiprocessing.current_process().daemon:
        # A task forked from a Celery prefork pool process inherits its daemon flag, and a daemonic
        # process may not start children: prepare batches in this process rather than fail the shard.
        logging.getLogger(__name__).warning("daemonic process (Celery prefork worker?): scoring with "
                                            "workers=0 instead of %d", workers)
        workers = 0
    batches = ShardBatches(shard, preprocessor.build(), batch_size, duplicates or {})
    return DataLoader(batches, batch_size=None, collate_fn=_as_is,
                      num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=PREFETCH_BATCHES if workers else None)


# --- writing a shard ---------------------------------------------------------------------------------

def _metadata(schema: pa.Schema, lineage: ShardLineage, predictor: Predictor) -> dict[bytes, bytes]:
    meta = {"contract": CONTRACT, "columns": {f.name: str(f.type) for f in schema}, **lineage.to_dict(),
            "labels": predictor.labels, "thresholds": predictor.thresholds}
    return {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}


class ShardWriter:
    """Streams a shard's predictions to a Parquet file that appears only when the shard completes, and
    collects its quarantine rows (few) to write at the end."""

    def __init__(self, uris: dict[str, str], predictor: Predictor, lineage: ShardLineage, scored_at: datetime):
        self.uris = uris
        schema = prediction_schema(predictor.tasks, lineage.explain)
        self.schema = schema.with_metadata(_metadata(schema, lineage, predictor))
        self.quarantine_metadata = _metadata(QUARANTINE_SCHEMA, lineage, predictor)
        self.constants = lineage_values(lineage.model_name, lineage.model_version, lineage.run_id, scored_at)
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = self.predicted = 0
        self.quarantine: list[tuple] = []

    def __enter__(self) -> "ShardWriter":
        self._stack = contextlib.ExitStack()
        sink = self._stack.enter_context(storage.atomic_output(self.uris["predictions"]))
        self._parquet = self._stack.enter_context(pq.ParquetWriter(sink, self.schema, compression="zstd"))
        return self

    def add(self, product_ids: list[str], columns: dict[str, Any], quarantine: list[tuple]) -> None:
        self.quarantine.extend(quarantine)
        if not product_ids:
            return
        n = len(product_ids)
        arrays = {KEY.name: product_ids, **columns, **{k: [v] * n for k, v in self.constants.items()}}
        self.buffer.append(pa.RecordBatch.from_pydict(arrays, schema=self.schema))
        self.buffered += n
        self.predicted += n
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self._parquet.write_table(pa.Table.from_batches(self.buffer), row_group_size=ROW_GROUP_ROWS)
        self.buffer, self.buffered = [], 0

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self._flush()
        # Closing the ExitStack closes the Parquet footer, then commits (or, on an exception, discards).
        self._stack.__exit__(kind, value, tb)
        if kind is None and self.quarantine:
            table = quarantine_table(self.quarantine, self.quarantine_metadata)
            with storage.atomic_output(self.uris["quarantine"]) as sink:
                pq.write_table(table, sink, compression="zstd")


def _remove_stale_temps(uri: str) -> None:
    """Temporary files of a killed writer (hidden `.<name>.tmp-*`, invisible to readers) are removed
    when the shard is redone, so a crash leaves nothing behind for long."""
    fs, path = storage.filesystem(uri)
    folder, name = path.rsplit("/", 1)
    if storage.is_local(fs) and fs.isdir(folder):
        for stale in fs.glob(f"{folder}/.{name}.tmp-*"):
            fs.rm(stale)


# --- scoring a shard ---------------------------------------------------------------------------------

def _matching_marker(uri: str, lineage: ShardLineage) -> ShardMarker | None:
    """The shard's marker if this exact work (plan, shard, model, columns) is committed; None if it must run."""
    if not storage.exists(uri):
        return None
    marker = ShardMarker.read(uri)
    if marker.work() != lineage.work():
        raise ValueError(f"{uri} records plan {marker.plan_id} / model {marker.model_name}:{marker.model_version}"
                         f" / explain {marker.explain}, not plan {lineage.plan_id} / {lineage.model_name}:"
                         f"{lineage.model_version} / explain {lineage.explain}: use another run id")
    outputs = [marker.predictions] + ([marker.quarantine] if marker.quarantine else [])
    return marker if all(storage.exists(u) for u in outputs) else None


def _shard_lineage(shard: Shard, predictor: Predictor, run_id: str, explain: bool) -> ShardLineage:
    return ShardLineage(**predictor.lineage.as_dict(), run_id=run_id, plan_id=shard.plan_id, shard=shard.id,
                        input_fingerprint=shard.input_fingerprint, precision=predictor.precision, explain=explain)


def score_shard(shard: Shard | dict, model: Any, out: str, *, run_id: str | None = None, batch_size: int = 32,
                workers: int | None = None, precision: str = "auto", compile: bool = False,
                progress: Callable[[int], None] | None = None, explain: bool = False) -> dict[str, Any]:
    """Score one shard and commit it: predictions Parquet, quarantine Parquet (if any), then the done
    marker. Skips the shard if its matching marker exists. Returns the marker (with `skipped`).
    `explain`: add each task's title and image contributions (`cmaclip.explain`; 3 forward passes)."""
    shard = Shard.from_dict(shard) if isinstance(shard, dict) else shard
    predictor = load_predictor(model, precision=precision, compile=compile)
    run_id = _check_run_id(run_id or default_run_id(shard.plan_id, predictor, explain))
    uris = output_uris(out, shard.id, predictor.lineage.name, predictor.lineage.version, run_id)
    lineage = _shard_lineage(shard, predictor, run_id, explain)
    done = _matching_marker(uris["marker"], lineage)
    if done is not None:
        if progress:
            progress(shard.rows)
        return {**done.to_dict(), "skipped": True}
    _remove_stale_temps(uris["predictions"])
    workers = default_workers(predictor.device) if workers is None else workers
    duplicates = _shard_duplicates(out, shard)
    marker = _run_shard(shard, predictor, uris, lineage, batch_size, workers, progress, duplicates)
    marker.write(uris["marker"])  # last: the shard counts as done only from here
    return {**marker.to_dict(), "skipped": False}


def _shard_duplicates(out: str, shard: Shard) -> dict[tuple[str, int], str]:
    if not shard.duplicates:
        return {}
    uri = duplicates_uri(out, shard.plan_id)
    if not storage.exists(uri):  # scoring on would publish one row's prediction for every row of its id
        raise FileNotFoundError(f"plan {shard.plan_id} found {shard.duplicates} rows of duplicated product_ids "
                                f"but {uri} is missing: plan with plan_shards(..., out={out!r})")
    return duplicate_ids.for_shard(uri, shard.id)


def _run_shard(shard: Shard, predictor: Predictor, uris: dict[str, str], lineage: ShardLineage, batch_size: int,
               workers: int, progress: Callable[[int], None] | None,
               duplicates: dict[tuple[str, int], str]) -> ShardMarker:
    started, scored_at = time.perf_counter(), datetime.now(timezone.utc)
    loader = batch_loader(shard, predictor.preprocessor, batch_size, workers,
                          pin_memory=predictor.device.type == "cuda", duplicates=duplicates)
    rows_in, waited, forward = 0, 0.0, 0.0
    with ShardWriter(uris, predictor, lineage, scored_at) as writer:
        tick = time.perf_counter()
        for batch in loader:
            t0 = time.perf_counter()
            waited += t0 - tick
            columns = predictor.predict(batch.pixels, batch.tokens, lineage.explain)
            tick = time.perf_counter()
            forward += tick - t0
            writer.add(batch.product_ids, columns, batch.quarantine)
            rows_in += batch.rows_in
            if progress:
                progress(batch.rows_in)
    if rows_in != shard.rows:
        raise RuntimeError(f"shard {shard.id}: read {rows_in} rows, the plan says {shard.rows}")
    total = time.perf_counter() - started
    timings = ShardTimings(total_s=round(total, 3), forward_s=round(forward, 3), wait_s=round(waited, 3),
                           rows_per_s=round(rows_in / max(total, 1e-9), 2))
    return ShardMarker(
        **lineage.to_dict(), rows_in=rows_in, predicted=writer.predicted, quarantined=len(writer.quarantine),
        reasons=dict(Counter(r[2] for r in writer.quarantine)), predictions=uris["predictions"],
        quarantine=uris["quarantine"] if writer.quarantine else None, batch_size=batch_size, workers=workers,
        scored_at=scored_at.isoformat(), timings=timings)


# --- finalize and publish ------------------------------------------------------------------------------

class RunIncomplete(RuntimeError):
    """finalize found shards that are missing or whose counts do not reconcile; `problems` lists them."""

    def __init__(self, run_id: str, problems: list[str]):
        super().__init__(f"run {run_id} is not complete: " + "; ".join(problems[:20])
                         + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))
        self.problems = problems


def _parquet_rows(uri: str | None) -> int:
    return 0 if uri is None else storage.parquet_file(uri).metadata.num_rows


def _shard_problems(shard: Shard, marker: ShardMarker | None) -> list[str]:
    if marker is None:
        return [f"shard {shard.id}: no done marker"]
    if marker.plan_id != shard.plan_id:
        return [f"shard {shard.id}: marker is from plan {marker.plan_id}"]
    problems = []
    if marker.rows_in != shard.rows:
        problems.append(f"shard {shard.id}: {marker.rows_in} rows in, the plan has {shard.rows}")
    if marker.rows_in != marker.predicted + marker.quarantined:
        problems.append(f"shard {shard.id}: rows in {marker.rows_in} != predicted {marker.predicted} "
                        f"+ quarantined {marker.quarantined}")
    try:
        files = (_parquet_rows(marker.predictions), _parquet_rows(marker.quarantine))
    except (FileNotFoundError, OSError) as exc:
        return problems + [f"shard {shard.id}: output missing ({exc})"]
    if files != (marker.predicted, marker.quarantined):
        problems.append(f"shard {shard.id}: files hold {files} rows, the marker says "
                        f"{(marker.predicted, marker.quarantined)}")
    return problems


def finalize(plan: Plan | dict, out: str, run_id: str) -> dict[str, Any]:
    """Check that every shard of the plan is committed and that rows in = predicted + quarantined, shard by
    shard (against the files' own row counts) and in total, and that every row of a duplicated product_id
    was quarantined as one; then write the run manifest. Idempotent: an existing manifest for the same run
    is returned unchanged."""
    plan = Plan.from_dict(plan) if isinstance(plan, dict) else plan
    _check_run_id(run_id)
    target = manifest_uri(out, run_id)
    if storage.exists(target):
        manifest = RunManifest.read(target)
        if manifest.plan_id == plan.id:
            return manifest.to_dict()
    markers = [_read_marker(out, run_id, shard) for shard in plan.shards]
    problems = [p for shard, marker in zip(plan.shards, markers) for p in _shard_problems(shard, marker)]
    problems += _run_problems(plan, [m for m in markers if m is not None], not problems)
    if problems:
        raise RunIncomplete(run_id, problems)
    manifest = _manifest(plan, run_id, markers)
    manifest.write(target)
    return manifest.to_dict()


def _read_marker(out: str, run_id: str, shard: Shard) -> ShardMarker | None:
    uri = storage.join(out, "_markers", f"run={run_id}", f"shard-{shard.id}.json")
    return ShardMarker.read(uri) if storage.exists(uri) else None


def _run_problems(plan: Plan, markers: list[ShardMarker], shards_ok: bool) -> list[str]:
    """What the shards' markers disagree on: one model, one schema, the plan's duplicated rows."""
    problems = []
    models = {(m.model_name, m.model_version) for m in markers}
    if len(models) > 1:
        problems.append(f"shards were scored by different models: {sorted(models)}")
    if len({m.explain for m in markers}) > 1:  # one run, one schema
        problems.append("some shards were scored with explain and some without")
    duplicates = sum(m.reasons.get(reasons.DUPLICATE_ID, 0) for m in markers)
    if shards_ok and not problems and duplicates != plan.duplicates:
        problems.append(f"{duplicates} rows were quarantined as {reasons.DUPLICATE_ID}; the plan found "
                        f"{plan.duplicates} rows of duplicated product_ids")
    return problems


def _manifest(plan: Plan, run_id: str, markers: list[ShardMarker]) -> RunManifest:
    reasons_total = Counter()
    for m in markers:
        reasons_total.update(m.reasons)
    first = markers[0]
    return RunManifest(
        contract=CONTRACT, run_id=run_id, plan_id=plan.id, catalog=plan.catalog,
        input_fingerprint=plan.fingerprint, rows_per_shard=plan.rows_per_shard, shards=len(markers),
        model_name=first.model_name, model_version=first.model_version, model_source=first.model_source,
        precision=first.precision, explain=first.explain, rows_in=sum(m.rows_in for m in markers),
        predicted=sum(m.predicted for m in markers), quarantined=sum(m.quarantined for m in markers),
        reasons=dict(sorted(reasons_total.items())), predictions=[m.predictions for m in markers],
        quarantine=[m.quarantine for m in markers if m.quarantine],
        scoring_seconds=round(sum(m.timings.total_s for m in markers), 3),
        finalized_at=datetime.now(timezone.utc).isoformat())


def read_run_manifests(out: str) -> list[RunManifest]:
    """Every finalized run under `out`, each manifest checked (`manifests.ManifestError` names a bad one)."""
    return [RunManifest.read(u) for u in storage.list_files(storage.join(out, "_manifests"), ".json")]


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
    latest = storage.join(out, "published", "latest.parquet")
    summary = {"runs": sorted(m.run_id for m in manifests), "files": len(files), "latest": latest,
               "products": write_parquet(_query(con, "publish_latest", {"predictions": files}), latest)}
    if catalog is not None:
        summary.update(_publish_catalog(con, catalog, latest, storage.join(out, "published", "catalog.parquet")))
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


# --- the command ----------------------------------------------------------------------------------------

def score(catalog: str, model: Any, out: str, shard: str | None = None, all: bool = True,
          rows_per_shard: int = 10_000, batch_size: int = 32, workers: int | None = None, precision: str = "auto",
          compile: bool = False, run_id: str | None = None, threads: int | None = None,
          progress: bool = True, image_roots: list[str] | None = None,
          image_hosts: list[str] | None = None, explain: bool = False) -> dict[str, Any]:
    """Plan, score one shard (`shard=ID`) or every shard (`all`), and finalize a complete run. Reruns
    resume: committed shards are skipped. Returns a summary dict. `explain`: see `score_shard`.

    `threads` sets torch's intra-op threads for this process. On a node shared with other busy processes,
    fewer threads than cores can be much faster: OpenMP threads wait for each other at every op, and a
    descheduled one stalls them all. `image_roots`, `image_hosts`: see `plan_shards`."""
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    plan = plan_shards(catalog, rows_per_shard, image_roots, image_hosts, out=out)
    shards = [plan.shard(shard)] if shard is not None else (plan.shards if all else [])
    if not shards:  # before the model loads: a wrong shard id fails at once
        raise ValueError("nothing to score: give shard=ID or all=True")
    predictor = load_predictor(model, precision=precision, compile=compile)
    run_id = _check_run_id(run_id or default_run_id(plan.id, predictor, explain))
    bar = tqdm(total=sum(s.rows for s in shards), unit="row", desc=f"score {run_id}", disable=not progress)
    markers = []
    with bar:
        for s in shards:
            markers.append(score_shard(s, predictor, out, run_id=run_id, batch_size=batch_size,
                                       workers=workers, progress=bar.update, explain=explain))
    summary = {"run_id": run_id, "plan_id": plan.id, "shards": len(plan.shards), "scored": len(markers),
               "skipped": sum(m["skipped"] for m in markers), "rows_in": sum(m["rows_in"] for m in markers),
               "predicted": sum(m["predicted"] for m in markers),
               "quarantined": sum(m["quarantined"] for m in markers),
               "model_name": predictor.lineage.name, "model_version": predictor.lineage.version,
               "precision": predictor.precision, "explain": explain, "seconds": round(time.perf_counter() - started, 3)}
    if shard is None:
        summary["manifest"] = manifest_uri(out, run_id)
        finalize(plan, out, run_id)
    return summary
