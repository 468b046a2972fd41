"""Ingest's row pass, one group of the plan at a time (`stage_group`): read the group's row groups, check
every row (pipeline.ingest.validate), stage the good rows sorted in dataset order and the bad ones with their
reason, then commit the group with a done marker.

Under the staging folder (any URI):
    group-<g>/rows.parquet        the good rows in dataset order (split key, product_id, seq), with the
                                  per-row metadata the whole-catalog decisions read (the `__` columns)
    group-<g>/quarantine.parquet  the bad rows (seq, product_id, reason, detail), in catalog order
    group-<g>.json                the done marker (manifests.StagedGroup), written last

Both files are committed whole or not at all (AtomicParquetWriter), so a group killed at any point leaves
no committed file, and its retry removes whatever the attempt left (the group's folder, its local scratch)
before starting again; a group with a marker for this plan is not staged again. Memory is bounded: rows are
read page by page in batches, and sorted by `external_sort` within its fixed budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .. import reasons
from ..io import storage
from ..io.catalog import iter_rows
from ..io.image_sources import fetch_images
from ..io.parquet_writer import AtomicParquetWriter
from ..io.sql import scratch_root
from ..manifests import StagedGroup
from .external_sort import sorted_tables
from .plan import IngestPlan, Unit, split_for_key, split_key
from .validate import Checked, RawRow, RowRules, check_rows

ORDER = ("__key", "product_id", "__seq")     # dataset order within a split; a split is a range of keys
STAGED_ROW_GROUP = 64    # rows per row group of a group's rows.parquet: a part reads a slice of every group,
                         # whole row groups at a time, so small ones waste little of what is read
QUARANTINE_ROW_GROUP = 8192
QUARANTINE_SCHEMA = pa.schema([("__seq", pa.int64()), ("product_id", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string())])


def staging_schema(tasks: tuple[str, ...]) -> pa.Schema:
    return pa.schema([("__seq", pa.int64()), ("__group", pa.int32()), ("__key", pa.string()), ("split", pa.string()),
                      ("product_id", pa.string()), ("title", pa.string()), ("image", pa.binary()),
                      *[(t, pa.string()) for t in tasks], ("__content_hash", pa.string()),
                      ("__image_sha", pa.string()), ("__title_sha", pa.string()), ("__labels_key", pa.string())])


@dataclass(frozen=True)
class GroupFiles:
    folder: str
    rows: str
    quarantine: str
    marker: str


def group_files(staging: str, group_id: str) -> GroupFiles:
    folder = storage.join(staging, f"group-{group_id}")
    return GroupFiles(folder, storage.join(folder, "rows.parquet"), storage.join(folder, "quarantine.parquet"),
                      storage.join(staging, f"group-{group_id}.json"))


def committed(plan: IngestPlan, staging: str, group_id: str) -> StagedGroup | None:
    """The group's marker when it is this plan's and its files hold the rows it counts; else None."""
    files = group_files(staging, group_id)
    if not storage.exists(files.marker):
        return None
    marker = StagedGroup.read(files.marker)
    if (marker.plan_id, marker.rows, marker.quarantine) != (plan.id, files.rows, files.quarantine) or \
            marker.rows_in != plan.group_rows(group_id):
        return None
    try:
        found = tuple(storage.parquet_file(u).metadata.num_rows for u in (marker.rows, marker.quarantine))
    except (FileNotFoundError, OSError):
        return None
    return marker if found == (marker.staged, marker.quarantined) else None


def scratch_folder(plan: IngestPlan, group_id: str, staging: str, root: str | None = None) -> str:
    """The group's local scratch (sorted runs): named after the plan, the group and where it stages, so a
    retry finds and removes what a killed attempt left there, while two ingests of one catalog into two
    places (the same plan) never share a folder."""
    place = hashlib.sha256(staging.encode()).hexdigest()[:12]
    return os.path.join(root or scratch_root(), f"cmaclip-ingest-{plan.id}-{group_id}-{place}")


def stage_group(plan: IngestPlan, group_id: str, staging: str, scratch: str | None = None) -> StagedGroup:
    """Stage group `group_id` of `plan` under `staging` and commit it (the marker); a group this plan already
    committed is returned as it is."""
    found = committed(plan, staging, group_id)
    if found is not None:
        return found
    files, local = group_files(staging, group_id), scratch_folder(plan, group_id, staging, scratch)
    storage.remove(files.marker)
    storage.remove(files.folder, recursive=True)
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    started = time.perf_counter()
    try:
        tally = _stage(plan, group_id, files, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    marker = StagedGroup(plan_id=plan.id, group=group_id, rows_in=tally.rows_in, staged=tally.staged,
                         quarantined=sum(tally.reasons.values()), reasons=dict(sorted(tally.reasons.items())),
                         images_converted=tally.converted, rows=files.rows, quarantine=files.quarantine,
                         seconds=round(time.perf_counter() - started, 3))
    marker.write(files.marker)
    return marker


@dataclass
class _Tally:
    rows_in: int = 0
    staged: int = 0
    converted: int = 0
    reasons: Counter = dataclasses.field(default_factory=Counter)


def _stage(plan: IngestPlan, group_id: str, files: GroupFiles, scratch: str) -> _Tally:
    tasks, tally = plan.params.tasks, _Tally()
    with AtomicParquetWriter(files.quarantine, QUARANTINE_SCHEMA, QUARANTINE_ROW_GROUP) as bad:
        with AtomicParquetWriter(files.rows, staging_schema(tasks), STAGED_ROW_GROUP, compression="none") as out:
            good = _checked_tables(plan, group_id, bad, tally)
            for table in sorted_tables(good, ORDER, scratch, STAGED_ROW_GROUP):
                out.write(table)
    promised = plan.group_rows(group_id)
    if tally.rows_in != promised:
        raise RuntimeError(f"group {group_id}: read {tally.rows_in} rows but the catalog footers promise {promised}")
    return tally


@dataclass
class Chunk:
    start: int                       # seq (catalog-wide row number) of the first row
    rows: list[RawRow]
    fetch_errors: dict[int, tuple[str, str]]  # row index -> (reason, detail): its image_uri was not read


def _chunks(plan: IngestPlan, units: list[Unit]) -> Iterator[Chunk]:
    """The group's rows in catalog order, a batch at a time; a file's units are consecutive row groups."""
    tasks, batch_rows = plan.params.tasks, plan.params.batch_rows
    for index, same_file in itertools.groupby(units, key=lambda u: u.file):
        same_file = list(same_file)
        file, seq = plan.files[index], same_file[0].seq
        for cols in iter_rows(file, tasks, batch_rows, [u.row_group for u in same_file]):
            images, errors = cols[file.image_column], {}
            if file.image_column == "image_uri":
                images, errors = fetch_images(images, file.uri, plan.params.sources)
            rows = list(zip(cols["product_id"], cols["title"], zip(*(cols[t] for t in tasks)), images))
            yield Chunk(seq, rows, errors)
            seq += len(rows)


def _checked_tables(plan: IngestPlan, group_id: str, bad: AtomicParquetWriter, tally: _Tally) -> Iterator[pa.Table]:
    """Each chunk checked: its bad rows written to `bad`, its good rows yielded as a table."""
    params = plan.params
    rules, schema = RowRules(params.tasks, params.limits, params.label_map), staging_schema(params.tasks)
    for chunk in _chunks(plan, plan.group(group_id)):
        good, quarantined = _split(chunk, check_rows(chunk.rows, rules), int(group_id), params.splits)
        if quarantined["reason"]:
            bad.write(pa.table(quarantined, schema=QUARANTINE_SCHEMA))
        tally.rows_in += len(chunk.rows)
        tally.staged += len(good)
        tally.converted += sum(c.image is not None for _, c in good)
        tally.reasons.update(quarantined["reason"])
        yield pa.table(_columns(good, schema), schema=schema)


def _split(chunk: Chunk, results: list[Checked], group: int,
           splits: tuple[float, float, float]) -> tuple[list[tuple[Any, Checked]], dict[str, list[Any]]]:
    """The good rows as ((seq, group, split key, split, catalog image bytes), result), and the bad rows'
    columns. A row whose image_uri could not be read has the fetch's reason, not `image_missing`."""
    good, bad = [], {name: [] for name in QUARANTINE_SCHEMA.names}
    for i, (row, res) in enumerate(zip(chunk.rows, results)):
        seq = chunk.start + i
        if i in chunk.fetch_errors and res.reason == reasons.IMAGE_MISSING:
            reason, detail = chunk.fetch_errors[i]
            res = dataclasses.replace(res, reason=reason, detail=detail)
        if res.reason is not None:
            for name, value in zip(bad, (seq, res.product_id, res.reason, res.detail)):
                bad[name].append(value)
            continue
        key = split_key(res.product_id)
        good.append(((seq, group, key, split_for_key(key, splits), row[3]), res))
    return good, bad


def _columns(good: list[tuple[Any, Checked]], schema: pa.Schema) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for (seq, group, key, split, raw_image), res in good:
        values = [seq, group, key, split, res.product_id, res.title, res.image if res.image is not None else raw_image,
                  *res.labels, res.content_hash, res.image_sha, _sha(res.title), _labels_key(res.labels)]
        for name, value in zip(cols, values):
            cols[name].append(value)
    return cols


def _sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _labels_key(labels: tuple[str | None, ...]) -> str:
    return "\x1f".join("\x00" if v is None else v for v in labels)
