"""Catalog ingest: validate every row, quarantine the bad ones with a reason, dedup, split, write.

The row pass runs per group of the catalog's row groups (pipeline.ingest.plan), in parallel processes here
or as mapped Airflow tasks: each group reads its rows, checks them (pipeline.ingest.validate) and stages
the good ones sorted in dataset order, committed with a done marker (pipeline.ingest.staging), so a retry
redoes only its own group. `finish` then takes the whole-catalog decisions in one streaming pass over the
staged rows' metadata only (pipeline.ingest.decide: duplicates, split positions, label counts) and writes
the dataset's parts, in parallel too (pipeline.ingest.dataset_writer), each image read once more. Part
boundaries are positions in dataset order, so the dataset is byte for byte the same for any number of groups
and processes.

Output under `out_uri`:
    dataset/part-<split>-<n>.parquet  product_id, title, image, one string column per task, split
    quarantine.parquet                product_id, stage ('ingest'), reason, detail
    labels.json                       per task: vocabulary (ordered; its index is the class id), counts
    manifest.json                     fingerprint, params, counts, vocabularies, files; written last, so
                                      its presence means the rest is complete

Rules (also recorded in the manifest):
- Rows in = rows kept + rows quarantined, checked before anything is committed.
- Titles: NFC, control characters removed, whitespace collapsed; a missing title is kept (null).
- Labels: cleaned like titles, then mapped through `label_map[task]` (synonyms); a missing label is kept
  (null) and masks only that task. Labels are case-sensitive: map case variants explicitly.
- Rare classes: a label seen on fewer than `min_class_count` kept rows (all splits together) becomes null
  for that task (masked, the row is kept); the manifest lists each masked label with its count.
- Duplicates (`duplicate_id`; ids compared after `pipeline.io.text.normalize_product_id`, as scoring and
  publish compare them): among rows that passed validation, the smallest content hash wins; the others are
  quarantined with what differs (image, title, labels). Scoring, which attributes every catalog row, keeps
  none of them instead (pipeline/scoring/duplicate_ids.py; docs/contracts.md, "Duplicate product_ids").
- Images: stored as the original bytes when already RGB JPEG/PNG/WebP; otherwise converted to RGB
  (alpha composited on white) and re-encoded, as JPEG q95 from a lossy source and PNG from a lossless one.
- Splits: by md5(product_id) (`split_of`), stable across re-ingests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from multiprocessing import current_process, get_context
from typing import Any, Callable

from .. import reasons
from ..io import storage
from ..io.catalog import CatalogError
from ..io.images import DEFAULT_LIMITS, ImageLimits
from ..io.sql import connect, load_sql, scratch_root
from ..manifests import (DatasetCounts, DatasetFiles, DatasetInput, DatasetManifest, DatasetPart, IngestRun,
                         ManifestError, StagedGroup)
from .dataset_writer import PartJob, part_name, write_part
from .decide import Decisions, LabelStats, decide, write_quarantine
from .plan import ROWS_PER_PART, SPLITS, IngestPlan, check_splits, check_tasks, make_params, plan_ingest, split_of
from .staging import committed, stage_group

__all__ = ["CatalogError", "ingest", "finish", "read_manifest", "read_labels", "dataset_files", "split_of", "SPLITS",
           "check_tasks", "check_splits"]

log = logging.getLogger(__name__)

FORMAT = "cmaclip.dataset/1"
MANIFEST, LABELS, QUARANTINE, DATASET = "manifest.json", "labels.json", "quarantine.parquet", "dataset"
PARALLEL_MIN_ROWS = 5000     # below this, starting worker processes costs more than it saves
GROUP_ROWS = 8192            # rows a group stages by default (a catalog's row groups permitting)
IMAGE_POLICY = ("original bytes when already RGB JPEG/PNG/WebP; otherwise converted to RGB (alpha on white) "
                "and re-encoded: JPEG q95 from a lossy source, PNG from a lossless one")


# --- processes --------------------------------------------------------------------------------------

def auto_workers(workers: int | None, rows: int) -> int:
    """`workers` processes (this one included) when given; else one per core (at most 8) for catalogs of
    PARALLEL_MIN_ROWS rows or more, one otherwise."""
    if workers is not None:
        return max(1, workers)
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_MIN_ROWS else 1


def auto_groups(rows: int, workers: int) -> int:
    """Groups of about GROUP_ROWS rows, and at least four per process when there are several: whoever frees
    up first takes the next group, largest first, so no process waits long on another's last one. Not
    smaller: every dataset part reads a slice of every group."""
    return max(4 * workers if workers > 1 else 1, math.ceil(rows / GROUP_ROWS))


@dataclasses.dataclass(frozen=True)
class Helpers:
    """`size` spawned processes that work beside this one."""
    executor: Executor
    size: int


@contextlib.contextmanager
def _pool(workers: int, uris: Sequence[str]) -> Iterator[Helpers | None]:
    """A pool of `workers - 1` processes (this process is the other one), or None (all in this process) for
    one worker, when a URI is in `memory://`, which other processes cannot see, or in a daemonic process (a
    task forked from a Celery prefork pool), which may not start children."""
    if workers <= 1 or any(storage.protocol(u) == "memory" for u in uris):
        yield None
        return
    if current_process().daemon:
        log.warning("daemonic process (Celery prefork worker?): ingest runs in this process, not on %d", workers)
        yield None
        return
    # spawn, not fork: the parent may hold s3fs/DuckDB threads, which do not survive a fork.
    pool = ProcessPoolExecutor(workers - 1, mp_context=get_context("spawn"))
    try:
        yield Helpers(pool, workers - 1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=False)  # all done: nobody needs to wait while the processes' interpreters wind down


def _map(pool: Helpers | None, fn: Callable, items: list[tuple]) -> list:
    """fn(*item) for each item, results in order. With a pool, this process works too: it and each pool
    process take the next item as they free up (the pool's processes start while this one already works)."""
    if pool is None or len(items) < 2:
        return [fn(*item) for item in items]
    results, todo, lock, failed = [None] * len(items), iter(enumerate(items)), threading.Lock(), threading.Event()

    def work(call: Callable) -> None:
        try:
            while not failed.is_set():
                with lock:
                    index, item = next(todo, (None, None))
                if item is None:
                    return
                results[index] = call(*item)
        except BaseException:
            failed.set()       # the others finish their item and stop; the first error is raised
            raise

    def remote(*item: Any) -> Any:
        return pool.executor.submit(fn, *item).result()

    with ThreadPoolExecutor(pool.size) as feeders:  # a thread waits on each pool process
        waiting = [feeders.submit(work, remote) for _ in range(pool.size)]
        try:
            work(fn)
        finally:
            errors = [f.exception() for f in waiting]
    if first := next((e for e in errors if e is not None), None):
        raise first
    return results


@contextlib.contextmanager
def _staging_folder(staging: str | None) -> Iterator[str]:
    """`staging` as given (kept: a rerun skips its committed groups), else a local temporary folder."""
    if staging is not None:
        yield staging
        return
    with tempfile.TemporaryDirectory(prefix="cmaclip-ingest-", dir=scratch_root()) as tmp:
        yield tmp


# --- finish: decisions, parts, quarantine, labels, manifest ----------------------------------------------

def staged_groups(plan: IngestPlan, staging: str) -> list[StagedGroup]:
    """Every group's marker; a RuntimeError naming the groups not (or not validly) staged."""
    markers = [committed(plan, staging, g) for g in plan.group_ids]
    missing = [g for g, m in zip(plan.group_ids, markers) if m is None]
    if missing:
        raise RuntimeError(f"ingest plan {plan.id}: groups {', '.join(missing)} are not staged under {staging}")
    return markers


def finish(plan: IngestPlan, staging: str, out_uri: str, workers: int | None = None,
           pool: Helpers | None = None, started: float | None = None) -> DatasetManifest:
    """Decide over the staged groups, write the dataset to `out_uri` (parts on `workers` processes, or on
    `pool`), its quarantine, labels and, last, its manifest."""
    started = time.perf_counter() if started is None else started
    markers, n_workers = staged_groups(plan, staging), auto_workers(workers, plan.rows)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cmaclip-ingest-", dir=scratch_root()))
        order = os.path.join(tmp, "order.parquet")
        decisions = decide(markers, plan.params, tmp, order)
        counts = _counts(plan, markers, decisions)
        _clear(out_uri)
        write_quarantine(markers, tmp, storage.join(out_uri, QUARANTINE))
        pool = pool or stack.enter_context(_pool(n_workers, [out_uri, staging]))
        dataset = _write_parts(plan, markers, decisions, order, out_uri, pool)
    verify_counts(out_uri, dataset, decisions.by_split)
    storage.write_json(storage.join(out_uri, LABELS), labels_document(decisions.stats))
    seconds = time.perf_counter() - started
    run = IngestRun(datetime.now(timezone.utc).isoformat(timespec="seconds"), round(seconds, 3),
                    round(plan.rows / max(seconds, 1e-9), 1), n_workers)
    manifest = _manifest(plan, counts, decisions.stats, dataset, run)
    manifest.write(storage.join(out_uri, MANIFEST))
    log.info("ingest done: %d kept, %d quarantined in %.1fs", counts.rows_kept, counts.rows_quarantined, seconds)
    return manifest


def _write_parts(plan: IngestPlan, markers: list[StagedGroup], decisions: Decisions, order: str, out_uri: str,
                 pool: Helpers | None) -> dict[str, list[DatasetPart]]:
    """Every part, each from its slice of the order file (sorted by split in SPLITS order, then position)."""
    params, jobs, start = plan.params, [], 0
    metadata = {"cmaclip.format": FORMAT, "cmaclip.input_fingerprint": plan.fingerprint}
    for split in SPLITS:
        kept = decisions.by_split[split]
        for index, first in enumerate(range(0, kept, params.part_rows)):
            jobs.append(PartJob(split, index, storage.join(out_uri, DATASET, part_name(split, index)), order,
                                start + first, min(params.part_rows, kept - first), tuple(m.rows for m in markers),
                                params.tasks, metadata, decisions.stats.rare, params.row_group_rows))
        start += kept
    rows = _map(pool, write_part, [(job,) for job in jobs])
    return {s: [DatasetPart(f"{DATASET}/{part_name(j.split, j.index)}", n) for j, n in zip(jobs, rows) if j.split == s]
            for s in SPLITS}


def verify_counts(out_uri: str, files: dict[str, list[DatasetPart]], expected: dict[str, int]) -> None:
    """Read the split column back from storage with DuckDB; the rows must be exactly the ones counted."""
    uris = [storage.join(out_uri, f.path) for parts in files.values() for f in parts]
    found: dict[str, int] = {}
    if uris:
        with connect() as con:
            storage.register_duckdb(con, uris[0])
            found = dict(con.execute(load_sql("dataset_counts"), {"files": uris}).fetchall())
    if any(found.get(s, 0) != expected[s] for s in SPLITS):
        raise RuntimeError(f"dataset at {out_uri} holds {found} rows per split; expected {expected}")


def _clear(out_uri: str) -> None:
    """The manifest goes first: without it the folder is not a dataset, even if a rerun dies halfway."""
    storage.remove(storage.join(out_uri, MANIFEST))
    storage.remove(storage.join(out_uri, DATASET), recursive=True)


def _manifest(plan: IngestPlan, counts: DatasetCounts, stats: LabelStats, dataset: dict[str, list[DatasetPart]],
              run: IngestRun) -> DatasetManifest:
    params = plan.params
    return DatasetManifest(
        format=FORMAT, catalog_uri=plan.catalog_uri, input=DatasetInput(plan.fingerprint, list(plan.files)),
        params={"tasks": list(params.tasks), "splits": dict(zip(SPLITS, params.splits)),
                "min_class_count": params.min_class_count, "label_map": params.label_map,
                "limits": dataclasses.asdict(params.limits), "row_group_rows": params.row_group_rows,
                "image_sources": params.sources.as_dict() if params.sources else None},
        counts=counts, vocabularies=stats.vocabularies, files=DatasetFiles(dataset, LABELS, QUARANTINE),
        image_policy=IMAGE_POLICY, run=run)


def _counts(plan: IngestPlan, markers: list[StagedGroup], decisions: Decisions) -> DatasetCounts:
    rows_in, kept, stats = sum(m.rows_in for m in markers), sum(decisions.by_split.values()), decisions.stats
    by_reason: Counter[str] = Counter()
    for m in markers:
        by_reason.update(m.reasons)
    if decisions.duplicates:
        by_reason[reasons.DUPLICATE_ID] += decisions.duplicates
    quarantined = sum(by_reason.values())
    if rows_in != plan.rows:
        raise RuntimeError(f"read {rows_in} rows but the catalog footers promise {plan.rows}")
    if rows_in != kept + quarantined:
        raise RuntimeError(f"row accounting broken: {rows_in} in != {kept} kept + {quarantined} quarantined")
    return DatasetCounts(
        rows_in=rows_in, rows_kept=kept, rows_quarantined=quarantined,
        quarantined_by_reason=dict(sorted(by_reason.items())), rows_by_split=decisions.by_split,
        images_converted=sum(m.images_converted for m in markers),
        labels_missing={t: kept - sum(c.values()) for t, c in stats.counts.items()},
        labels_masked_rare=stats.rare)


# --- the entry point --------------------------------------------------------------------------------

def ingest(catalog_uri: str, tasks: Sequence[str] | str, out_uri: str, *,
           splits: Sequence[float] = (0.8, 0.1, 0.1), min_class_count: int = 5,
           label_map: dict[str, dict[str, str]] | None = None, limits: ImageLimits = DEFAULT_LIMITS,
           workers: int | None = None, groups: int | None = None, batch_rows: int = 512,
           row_group_rows: int = 1024, rows_per_part: int = ROWS_PER_PART, image_roots: Sequence[str] | None = None,
           image_hosts: Sequence[str] | None = None, staging: str | None = None) -> dict[str, Any]:
    """Ingest a catalog (file, folder or glob; any fsspec URI) into a dataset at `out_uri`; the manifest as
    written (JSON: `DatasetManifest.to_dict()`).

    Raises CatalogError (before writing anything) when a catalog file cannot be used at all. `workers`:
    processes that stage groups and write parts, this one included (None: one per core for catalogs of 5000+
    rows, else one); `groups`: how many groups the row pass is cut into (default: `auto_groups`). `staging`: where groups are
    staged (default: a local temporary folder, removed after); given, a rerun skips the groups it committed.
    `image_roots`, `image_hosts`: what `image_uri` rows may read besides the catalog's own folder
    (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`; see pipeline.io.image_sources).
    """
    started = time.perf_counter()
    params = make_params(catalog_uri, tasks, splits=splits, min_class_count=min_class_count, label_map=label_map,
                         limits=limits, batch_rows=batch_rows, row_group_rows=row_group_rows,
                         rows_per_part=rows_per_part, image_roots=image_roots, image_hosts=image_hosts)
    plan = plan_ingest(catalog_uri, params)
    n_workers = auto_workers(workers, plan.rows)
    plan = plan.regrouped(groups or auto_groups(plan.rows, n_workers))
    log.info("ingest %s (%d files, %d rows) -> %s: %d groups on %d processes", catalog_uri, len(plan.files),
             plan.rows, out_uri, len(plan.group_ids), n_workers)
    with _staging_folder(staging) as folder, _pool(n_workers, [catalog_uri, out_uri, folder]) as pool:
        largest_first = sorted(plan.group_ids, key=lambda g: -plan.group_rows(g))
        _map(pool, stage_group, [(plan, g, folder) for g in largest_first])
        manifest = finish(plan, folder, out_uri, n_workers, pool, started)
    return manifest.to_dict()


def labels_document(stats: LabelStats) -> dict[str, Any]:
    return {t: {"vocabulary": stats.vocabularies[t], "counts": stats.counts[t],
                "counts_by_split": stats.counts_by_split[t]} for t in stats.vocabularies}


# --- readers ----------------------------------------------------------------------------------------

def read_manifest(out_uri: str) -> DatasetManifest:
    """The dataset's manifest, checked field by field (`ManifestError` names the file and the field)."""
    uri = storage.join(out_uri, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no {MANIFEST} at {out_uri}: not an ingested dataset, or its ingest did not finish")
    manifest = DatasetManifest.read(uri)
    if manifest.format != FORMAT:
        raise ManifestError(uri, "format", f"is {manifest.format!r}; this version reads {FORMAT!r}")
    return manifest


def read_labels(out_uri: str) -> dict[str, Any]:
    """Per task: {"vocabulary": [...], "counts": {...}, "counts_by_split": {...}}."""
    return storage.read_json(storage.join(out_uri, LABELS))


def vocabularies(out_uri: str) -> dict[str, list[str]]:
    return {task: doc["vocabulary"] for task, doc in read_labels(out_uri).items()}


def dataset_files(out_uri: str, split: str) -> list[dict[str, Any]]:
    """The parts of one split as [{"uri", "rows"}], from the manifest (never a folder listing, so
    leftovers of another run are never read)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    parts = read_manifest(out_uri).files.dataset[split]
    return [{"uri": storage.join(out_uri, f.path), "rows": f.rows} for f in parts]
