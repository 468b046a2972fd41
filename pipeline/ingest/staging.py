"""Ingest pass 1: stream the catalog in row batches, check every row, stage the good ones locally.

Rows are checked in order, inline or in a process pool with a bounded number of chunks in flight, so
memory stays bounded whatever the catalog size. Good rows go to a local Parquet file with internal
`__` columns (row number, hashes) that the DuckDB decisions of pass 2 read; bad rows come back as
(row number, product_id, reason, detail).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import reasons
from ..io import storage
from ..io.catalog import CatalogFile, iter_rows
from ..io.image_sources import ImageSources, fetch_images
from .validate import Checked, RawRow, RowRules, check_rows

PARALLEL_MIN_ROWS = 5000     # below this, starting worker processes costs more than it saves

# (seq, product_id, reason, detail)
QuarantineRow = tuple[int, "str | None", str, str]


def auto_workers(workers: int | None, rows: int) -> int:
    """Inline on small catalogs and on 1-2 cores: there the main process (Parquet reads, staging,
    pickling) competes with the workers, and a pool measured no faster than inline on fashion-small."""
    if workers is not None:
        return max(0, workers)
    cores = os.cpu_count() or 1
    return min(cores, 8) if rows >= PARALLEL_MIN_ROWS and cores > 2 else 0


@dataclass
class Chunk:
    start: int                       # seq (catalog-wide row number) of the first row
    rows: list[RawRow]
    fetch_errors: dict[int, tuple[str, str]]  # row index -> (reason, detail): its image_uri was not read


def staging_schema(tasks: tuple[str, ...]) -> pa.Schema:
    return pa.schema([("__seq", pa.int64()), ("product_id", pa.string()), ("title", pa.string()),
                      ("image", pa.binary()), *[(t, pa.string()) for t in tasks],
                      ("__content_hash", pa.string()), ("__image_sha", pa.string()), ("__labels_key", pa.string())])


def _chunks(files: list[CatalogFile], tasks: tuple[str, ...], batch_rows: int,
            sources: ImageSources) -> Iterator[Chunk]:
    seq = 0
    for file in files:
        for cols in iter_rows(file, tasks, batch_rows):
            images, errors = cols[file.image_column], {}
            if file.image_column == "image_uri":
                images, errors = fetch_images(images, file.uri, sources)
            labels = list(zip(*(cols[t] for t in tasks)))
            rows = list(zip(cols["product_id"], cols["title"], labels, images))
            yield Chunk(seq, rows, errors)
            seq += len(rows)


def _ordered_results(chunks: Iterator[Chunk], rules: RowRules, pool: Executor | None,
                     in_flight: int) -> Iterator[tuple[Chunk, list[Checked]]]:
    """check_rows over chunks, in order, with at most `in_flight` chunks queued (bounded memory)."""
    if pool is None:
        for chunk in chunks:
            yield chunk, check_rows(chunk.rows, rules)
        return
    pending: deque[tuple[Chunk, Future]] = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(check_rows, chunk.rows, rules)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _pool(workers: int) -> contextlib.AbstractContextManager[Executor | None]:
    if workers <= 0:
        return contextlib.nullcontext()
    # spawn, not fork: the parent may hold s3fs/DuckDB threads, which do not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))


def _stage_chunk(chunk: Chunk, results: list[Checked], tasks: tuple[str, ...],
                 quarantine: list[QuarantineRow]) -> tuple[dict[str, list[Any]], int]:
    cols: dict[str, list[Any]] = {name: [] for name in staging_schema(tasks).names}
    converted = 0
    for i, (row, res) in enumerate(zip(chunk.rows, results)):
        seq = chunk.start + i
        if i in chunk.fetch_errors and res.reason == reasons.IMAGE_MISSING:
            reason, detail = chunk.fetch_errors[i]
            res = dataclasses.replace(res, reason=reason, detail=detail)
        if res.reason is not None:
            quarantine.append((seq, res.product_id, res.reason, res.detail))
            continue
        converted += res.image is not None
        values = [seq, res.product_id, res.title, res.image if res.image is not None else row[3],
                  *res.labels, res.content_hash, res.image_sha, _labels_key(res.labels)]
        for name, value in zip(cols, values):
            cols[name].append(value)
    return cols, converted


def _labels_key(labels: tuple[str | None, ...]) -> str:
    return "\x1f".join("\x00" if v is None else v for v in labels)


def stage(files: list[CatalogFile], rules: RowRules, staging_path: str, workers: int,
          batch_rows: int, sources: ImageSources) -> tuple[int, int, list[QuarantineRow]]:
    """Pass 1: (rows read, images converted, quarantined rows); good rows go to `staging_path`."""
    schema = staging_schema(rules.tasks)
    quarantine: list[QuarantineRow] = []
    rows_in = converted = 0
    with _pool(workers) as pool, pq.ParquetWriter(staging_path, schema, compression="none") as writer:
        chunks = _chunks(files, rules.tasks, batch_rows, sources)
        for chunk, results in _ordered_results(chunks, rules, pool, in_flight=2 * max(1, workers)):
            cols, n_converted = _stage_chunk(chunk, results, rules.tasks, quarantine)
            writer.write_table(pa.table(cols, schema=schema))
            rows_in += len(chunk.rows)
            converted += n_converted
    return rows_in, converted, quarantine
