"""Read a shard and prepare its batches for the forward pass: its Parquet row ranges as Arrow slices,
then (in DataLoader workers) product ids checked, images fetched, rows hashed, decoded and preprocessed,
titles tokenized; the rows that cannot be prepared come out as quarantine rows, and the rows whose
prediction is carried over (pipeline/scoring/carry_over.py) come out by product_id, neither decoded nor
forwarded. The rows to score are forwarded in full batches whatever lies between them (`full_batches`).

Speed: the main thread only runs the forward pass; DataLoader workers read the shard's Parquet row groups,
decode and preprocess images and tokenize titles ahead of it, where there is a core the forward pass does
not use (see `default_workers`). Memory: a shard is streamed batch by batch (one row group's column chunks
at a time), so peak memory does not depend on catalog size.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import reasons
from ..io import storage
from ..io.content_hash import content_hashes
from ..io.image_sources import fetch_images
from .planner import Shard
from .predictor import Preprocessor, check_product_id, decode_rows

READ_BUFFER = 1 << 20             # Parquet pages are read through this buffer, not whole column chunks
PREFETCH_BATCHES = 4               # per worker: enough to hide a slow image, little memory
SOURCE_FILE = "_catalog_file"      # raw_batches: the catalog file each row came from
DUPLICATE = "_duplicate_id"        # raw_batches: why the row is quarantined as duplicate_id (null: it is not)
CARRY = "_carry_hash"              # raw_batches: the state's content hash where the row may be carried over


@dataclass
class PreparedBatch:
    """One batch of a shard, ready for the forward pass, plus the rows that could not be prepared."""
    index: int
    rows_in: int
    product_ids: list[str]
    content_hashes: list[str]         # of each row of `product_ids`
    pixels: torch.Tensor
    tokens: torch.Tensor
    quarantine: list[tuple]
    carried: list[str]                # the product_ids whose prediction is carried over

    def pin_memory(self) -> "PreparedBatch":
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), tokens=self.tokens.pin_memory())


def batch_schema(image_column: str) -> pa.Schema:
    """One schema for every slice of a shard, whatever types its files use (a batch may span files). The
    files of one catalog may store text as string, large or view string, dictionary, binary or null, and
    `image` as binary or large binary: all are read as bytes, and text cells are decoded one by one
    (`pipeline.io.text`), so a cell that is not UTF-8 quarantines its row instead of failing the batch."""
    return pa.schema([("product_id", pa.large_binary()), ("title", pa.large_binary()),
                      (image_column, pa.large_binary()), (SOURCE_FILE, pa.string()), (DUPLICATE, pa.string()),
                      (CARRY, pa.string())])


def _as_bytes(column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    # A cast copies the column, and the image column is most of a batch's memory: only when it must.
    return column if column.type == pa.large_binary() else column.cast(pa.large_binary())


def _marks(marked: dict[tuple[str, int], str], file: str, first_row: int, n: int) -> pa.Array:
    return pa.array([marked.get((file, first_row + i)) for i in range(n)] if marked else [None] * n, pa.string())


def _canonical(batch: pa.RecordBatch, schema: pa.Schema, file: str, first_row: int,
               duplicates: dict[tuple[str, int], str], carry: dict[tuple[str, int], str]) -> pa.RecordBatch:
    """A slice of `file` starting at its row `first_row`, in `batch_schema`: the file of each row (relative
    image URIs start from there), why it is a duplicate if it is one, and the state's content hash if its
    prediction may be carried over."""
    n = batch.num_rows
    columns = [_as_bytes(batch.column(i)) for i in range(3)]
    columns += [pa.array([file] * n, pa.string()), _marks(duplicates, file, first_row, n),
                _marks(carry, file, first_row, n)]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def raw_batches(shard: Shard, batch_size: int, duplicates: dict[tuple[str, int], str] | None = None,
                carry: dict[tuple[str, int], str] | None = None) -> Iterator[list[pa.RecordBatch]]:
    """The shard's rows as Arrow slices in `batch_schema`, `batch_size` rows per batch, in plan order. Reads
    one row group's column chunks at a time: memory is bounded by the row-group size. `duplicates`: the
    shard's rows of duplicated ids, (file, row) -> detail (`duplicate_ids.for_shard`); `carry`: its rows
    that may be carried over, (file, row) -> the state's content hash (`carry_over.for_shard`)."""
    columns, schema = ["product_id", "title", shard.image_column], batch_schema(shard.image_column)
    pending, pending_rows, opened = [], 0, None
    for piece in shard.pieces:
        if opened is None or opened[0] != piece.file:
            opened = (piece.file, storage.parquet_file(piece.file, buffer_size=READ_BUFFER))
        meta = opened[1].metadata
        group_start = sum(meta.row_group(g).num_rows for g in range(piece.row_group))  # as a row of the file
        offset = 0
        for batch in opened[1].iter_batches(batch_size=batch_size, row_groups=[piece.row_group], columns=columns):
            batch = _canonical(batch, schema, piece.file, group_start + offset, duplicates or {}, carry or {})
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
        table = table.take(pa.array(keep, pa.int64()))  # typed: an empty list would be null-typed
    return table.set_column(0, "product_id", pa.array(ids, pa.large_string())), quarantine


def _cells(column: pa.ChunkedArray) -> Iterator[Any]:
    """A column's values one at a time: an image's bytes live as a Python object only while it decodes."""
    for chunk in column.chunks:
        for i in range(len(chunk)):
            yield chunk[i].as_py()


def _fetched(table: pa.Table, shard: Shard) -> tuple[pa.Table, list[tuple]]:
    """For an `image_uri` shard, the image column replaced by the bytes each URI names, and the quarantine
    rows of those that could not be read (their rows dropped)."""
    if shard.image_column != "image_uri":
        return table, []
    ids = table.column(0).to_pylist()
    images, failed = fetch_images(list(_cells(table.column(2))), table.column(SOURCE_FILE).to_pylist(), shard.sources)
    table = table.set_column(2, shard.image_column, pa.array(images, pa.large_binary()))
    if failed:
        table = table.filter(pa.array([i not in failed for i in range(len(ids))]))
    return table, [(ids[i], "score", reason, why) for i, (reason, why) in failed.items()]


def _without_carried(table: pa.Table, hashes: pa.Array) -> tuple[pa.Table, pa.Array, list[str]]:
    """The rows to score and their hashes, and the product_ids of the rows carried over: those whose content
    hashes as the state's prediction of them was made from (the plan's mark)."""
    carried = pc.fill_null(pc.equal(hashes, table.column(CARRY).combine_chunks()), False)
    if not pc.any(carried).as_py():
        return table, hashes, []
    keep = pc.invert(carried)
    return table.filter(keep), hashes.filter(keep), table.column(0).filter(carried).to_pylist()


@dataclass
class CheckedSlice:
    """A read slice after the per-row work: its rows to score (decoded, each with its content hash), the
    product_ids carried over and the quarantine rows."""
    rows_in: int
    to_score: list[tuple]             # (product_id, title, PIL image, content hash), in read order
    carried: list[str]
    quarantine: list[tuple]


def check_slice(slices: list[pa.RecordBatch], preprocessor: Preprocessor, shard: Shard) -> CheckedSlice:
    """Check ids, fetch, hash, set the carried rows apart and decode the others; runs in a DataLoader worker."""
    table = pa.Table.from_batches(slices)
    rows_in = table.num_rows
    table, unkeyed = _keyed(table)
    table, unfetched = _fetched(table, shard)
    table, hashes, carried = _without_carried(table, content_hashes(table.column(1), table.column(2)))
    ids, titles = table.column(0).to_pylist(), table.column(1).to_pylist()
    good, bad = decode_rows(zip(ids, titles, _cells(table.column(2))), draft=preprocessor.draft)
    hash_of = dict(zip(ids, hashes.to_pylist()))  # ids are unique here: duplicated ones were quarantined
    to_score = [(p, t, image, hash_of[p]) for p, t, image in zip(good.product_ids, good.titles, good.images)]
    return CheckedSlice(rows_in, to_score, carried, unkeyed + unfetched + bad)


def _prepared(index: int, checked: CheckedSlice, to_score: list[tuple], preprocessor: Preprocessor) -> PreparedBatch:
    """The tensors of `to_score` (rows of this slice or of those before it), and `checked`'s other rows."""
    ids, titles, images, hashes = (list(c) for c in zip(*to_score)) if to_score else ([], [], [], [])
    return PreparedBatch(index, checked.rows_in, ids, hashes, preprocessor.images(images),
                         preprocessor.texts(titles), checked.quarantine, checked.carried)


def prepare_batch(index: int, slices: list[pa.RecordBatch], preprocessor: Preprocessor,
                  shard: Shard) -> PreparedBatch:
    """One read slice ready for the forward pass, every row to score in it (tests and bench/scoring.py)."""
    checked = check_slice(slices, preprocessor, shard)
    return _prepared(index, checked, checked.to_score, preprocessor)


def full_batches(checked: Iterator[tuple[int, CheckedSlice]], preprocessor: Preprocessor,
                 batch_size: int) -> Iterator[PreparedBatch]:
    """One batch per read slice, with that slice's carried and quarantine rows, and `batch_size` rows to
    score whenever that many have come (from it and the slices before it); a last one with the rest.

    Why: in an incremental night a read slice holds one or two rows to score among carried ones, and a
    forward call has a fixed cost (8-170 ms on 2 CPU cores, tiny config) plus one per new input shape:
    forwarding each slice's few rows made the night cost what scoring everything would, nearly. Memory:
    fewer than 2 x `batch_size` decoded images (at the model's input size) wait here."""
    waiting: list[tuple] = []
    index = -1
    for index, one in checked:
        waiting += one.to_score
        ready = batch_size if len(waiting) >= batch_size else 0  # a slice adds <= batch_size rows: one batch
        yield _prepared(index, one, waiting[:ready], preprocessor)
        waiting = waiting[ready:]
    if waiting:
        yield _prepared(index + 1, CheckedSlice(0, [], [], []), waiting, preprocessor)


class ShardBatches(IterableDataset):
    """The prepared batches of one shard. With n workers, worker w checks read slices w, w+n, ... and
    re-batches their rows to score (`full_batches`); the DataLoader takes the batches round-robin, so they
    come out in one order for a given worker count. Rows scored from a slice may come out after carried rows
    of later slices: the predictions' row order is deterministic, not the catalog's."""

    def __init__(self, shard: Shard, preprocessor: Preprocessor, batch_size: int,
                 duplicates: dict[tuple[str, int], str], carry: dict[tuple[str, int], str]):
        self.shard, self.preprocessor, self.batch_size = shard, preprocessor, batch_size
        self.duplicates, self.carry = duplicates, carry

    def __iter__(self) -> Iterator[PreparedBatch]:
        info = get_worker_info()
        workers, me = (1, 0) if info is None else (info.num_workers, info.id)
        mine = ((index, check_slice(slices, self.preprocessor, self.shard))
                for index, slices in enumerate(raw_batches(self.shard, self.batch_size, self.duplicates, self.carry))
                if index % workers == me)  # every worker reads the (compressed) rows; each decodes only its own
        yield from full_batches(mine, self.preprocessor, self.batch_size)


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
                 pin_memory: bool = False, duplicates: dict[tuple[str, int], str] | None = None,
                 carry: dict[tuple[str, int], str] | None = None) -> DataLoader:
    if workers and multiprocessing.current_process().daemon:
        # A task forked from a Celery prefork pool process inherits its daemon flag, and a daemonic
        # process may not start children: prepare batches in this process rather than fail the shard.
        logging.getLogger(__name__).warning("daemonic process (Celery prefork worker?): scoring with "
                                            "workers=0 instead of %d", workers)
        workers = 0
    batches = ShardBatches(shard, preprocessor.build(), batch_size, duplicates or {}, carry or {})
    return DataLoader(batches, batch_size=None, collate_fn=_as_is,
                      num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=PREFETCH_BATCHES if workers else None)
