"""Catalog ingest: validate every row, quarantine the bad ones with a reason, dedup, split, write.

Pass 1 (pipeline.ingest.staging) streams the catalog in row batches (memory bounded), checks each row
(pipeline.ingest.validate, in a process pool for big catalogs) and stages the good rows in a local Parquet
file. DuckDB then decides, with the SQL in queries/: which row wins each duplicated product_id, the split
of each product, the label counts. Pass 2 streams the staged rows in that order into the dataset parts.

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
- Splits: by md5(product_id) (see queries/ingest_split.sql and `split_of`), stable across re-ingests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from .. import reasons
from ..contracts import quarantine_table
from ..io import image_sources, storage
from ..io.catalog import CatalogError, CatalogFile, fingerprint, scan
from ..io.image_sources import ImageSources
from ..io.images import DEFAULT_LIMITS, ImageLimits
from ..io.parquet_writer import write_table
from ..io.sql import load_sql
from ..manifests import (DatasetCounts, DatasetFiles, DatasetInput, DatasetManifest, DatasetPart, IngestRun,
                         ManifestError)
from .dataset_writer import PartWriter
from .staging import QuarantineRow, auto_workers, stage
from .validate import RowRules

__all__ = ["CatalogError", "ingest", "read_manifest", "read_labels", "dataset_files", "split_of", "SPLITS"]

log = logging.getLogger(__name__)

FORMAT = "cmaclip.dataset/1"
SPLITS = ("train", "validation", "test")
RESERVED = frozenset({"product_id", "title", "image", "image_uri", "split"})
MANIFEST, LABELS, QUARANTINE, DATASET = "manifest.json", "labels.json", "quarantine.parquet", "dataset"
DUCKDB_MEMORY = "2GB"        # the dataset sort spills to the staging folder beyond this
IMAGE_POLICY = ("original bytes when already RGB JPEG/PNG/WebP; otherwise converted to RGB (alpha on white) "
                "and re-encoded: JPEG q95 from a lossy source, PNG from a lossless one")


@dataclass(frozen=True)
class IngestParams:
    tasks: tuple[str, ...]
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_class_count: int = 5
    label_map: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    limits: ImageLimits = DEFAULT_LIMITS
    batch_rows: int = 512
    row_group_rows: int = 1024
    rows_per_part: int = 20_000
    sources: ImageSources | None = None   # what `image_uri` rows may read; set from the catalog's root


# --- parameters -------------------------------------------------------------------------------------

def check_tasks(tasks: Sequence[str] | str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    if not names:
        raise ValueError("at least one task (a label column) is needed")
    for name in names:
        if name in RESERVED or name.startswith("__") or not name.isidentifier():
            raise ValueError(f"task name {name!r} is not allowed (reserved, or not an identifier)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    return names


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in splits)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, validation, test) summing to 1; got {splits}")
    return values  # type: ignore[return-value]


def split_of(product_id: str, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split ingest gives `product_id`; the same arithmetic as queries/ingest_split.sql."""
    train, validation, _ = check_splits(splits)
    key = int(hashlib.md5(product_id.encode("utf-8")).hexdigest()[:12], 16) / 2**48
    return "train" if key < train else "validation" if key < train + validation else "test"


# --- DuckDB decisions -------------------------------------------------------------------------------

def _connect(tmpdir: str) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"temp_directory": os.path.join(tmpdir, "duckdb"),
                                  "memory_limit": DUCKDB_MEMORY})


def decide(con: duckdb.DuckDBPyConnection, staging: str,
           params: IngestParams) -> tuple[list[QuarantineRow], dict[str, int], LabelStats]:
    """Duplicates to quarantine, kept rows per split, label statistics (leaves temp table `kept`)."""
    duplicates = _duplicates(con, staging)
    con.execute(load_sql("ingest_split"), {"train": params.splits[0], "validation": params.splits[1]})
    by_split = {s: 0 for s in SPLITS} | dict(con.execute(load_sql("ingest_split_counts")).fetchall())
    rows = con.execute(load_sql("ingest_label_counts"), {"staging": staging}).fetchall()
    return duplicates, by_split, label_stats(rows, params.tasks, params.min_class_count)


def _duplicates(con: duckdb.DuckDBPyConnection, staging: str) -> list[QuarantineRow]:
    con.execute(load_sql("ingest_rank"), {"staging": staging})
    rows = con.execute(load_sql("ingest_duplicates")).fetchall()
    return [(seq, pid, reasons.DUPLICATE_ID,
             f"another row with this id was kept (content hash {kept[:12]}); this one differs in: {differs or 'nothing (exact copy)'}")
            for seq, pid, kept, differs in rows]


@dataclass
class LabelStats:
    vocabularies: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    counts_by_split: dict[str, dict[str, dict[str, int]]]
    rare: dict[str, dict[str, int]]


def label_stats(rows: list[tuple[str, str, str, int]], tasks: tuple[str, ...], min_count: int) -> LabelStats:
    """Vocabulary per task (sorted labels), counts, and the rare labels to mask (count < min_count)."""
    total: dict[str, Counter] = {t: Counter() for t in tasks}
    by_split: dict[str, dict[str, Counter]] = {t: {s: Counter() for s in SPLITS} for t in tasks}
    for task, label, split, n in rows:
        total[task][label] += n
        by_split[task][split][label] += n
    rare = {t: {lab: n for lab, n in sorted(total[t].items()) if n < min_count} for t in tasks}
    vocab = {t: sorted(lab for lab in total[t] if lab not in rare[t]) for t in tasks}
    counts = {t: {lab: total[t][lab] for lab in vocab[t]} for t in tasks}
    splits = {t: {s: {lab: by_split[t][s][lab] for lab in vocab[t] if by_split[t][s][lab]} for s in SPLITS}
              for t in tasks}
    return LabelStats(vocab, counts, splits, rare)


# --- pass 2: write ----------------------------------------------------------------------------------

def dataset_schema(tasks: tuple[str, ...], metadata: dict[str, str]) -> pa.Schema:
    fields = [pa.field("product_id", pa.string(), nullable=False), ("title", pa.string()),
              ("image", pa.binary()), *[(t, pa.string()) for t in tasks], ("split", pa.string())]
    return pa.schema(fields, metadata=metadata)


def _mask_rare(table: pa.Table, rare: dict[str, dict[str, int]]) -> pa.Table:
    for task, labels in rare.items():
        if labels:
            column = table.column(task)
            masked = pc.if_else(pc.is_in(column, value_set=pa.array(list(labels), pa.string())),
                                pa.scalar(None, pa.string()), column)
            table = table.set_column(table.schema.get_field_index(task), task, masked)
    return table


def write_dataset(con: duckdb.DuckDBPyConnection, staging: str, out_uri: str, schema: pa.Schema,
                  rare: dict[str, dict[str, int]], params: IngestParams) -> dict[str, list[DatasetPart]]:
    """Pass 2: the kept rows, in split and hash order, into rolling parts under out_uri/dataset/."""
    relation = con.sql(load_sql("ingest_dataset"), params={"staging": staging})
    reader = relation.to_arrow_reader(params.batch_rows)
    writer = PartWriter(storage.join(out_uri, DATASET), schema, params.row_group_rows, params.rows_per_part)
    with writer:
        for batch in reader:
            table = _mask_rare(pa.Table.from_batches([batch]).cast(schema), rare)
            for split in SPLITS:
                part = table.filter(pc.equal(table.column("split"), split))
                if part.num_rows:
                    writer.write(split, part)
    return {s: [DatasetPart(f"{DATASET}/{f['path']}", f["rows"]) for f in writer.files.get(s, [])] for s in SPLITS}


def verify_counts(out_uri: str, files: dict[str, list[DatasetPart]], expected: dict[str, int]) -> None:
    """Read the split column back from storage with DuckDB; the rows must be exactly the ones counted."""
    uris = [storage.join(out_uri, f.path) for parts in files.values() for f in parts]
    found: dict[str, int] = {}
    if uris:
        con = duckdb.connect()
        storage.register_duckdb(con, uris[0])
        found = dict(con.execute(load_sql("dataset_counts"), {"files": uris}).fetchall())
        con.close()
    if any(found.get(s, 0) != expected[s] for s in SPLITS):
        raise RuntimeError(f"dataset at {out_uri} holds {found} rows per split; expected {expected}")


def write_quarantine(uri: str, rows: list[QuarantineRow]) -> None:
    rows = sorted(rows, key=lambda r: r[0])  # catalog row order
    table = quarantine_table((pid, "ingest", reason, detail) for _, pid, reason, detail in rows)
    write_table(uri, table)


def _clear(out_uri: str) -> None:
    """The manifest goes first: without it the folder is not a dataset, even if a rerun dies halfway."""
    storage.remove(storage.join(out_uri, MANIFEST))
    storage.remove(storage.join(out_uri, DATASET), recursive=True)


# --- the entry point --------------------------------------------------------------------------------

def _manifest(catalog_uri: str, files: list[CatalogFile], params: IngestParams, counts: DatasetCounts,
              stats: LabelStats, dataset: dict[str, list[DatasetPart]], run: IngestRun) -> DatasetManifest:
    return DatasetManifest(
        format=FORMAT, catalog_uri=catalog_uri, input=DatasetInput(fingerprint(files), list(files)),
        params={"tasks": list(params.tasks), "splits": dict(zip(SPLITS, params.splits)),
                "min_class_count": params.min_class_count, "label_map": params.label_map,
                "limits": dataclasses.asdict(params.limits), "row_group_rows": params.row_group_rows,
                "image_sources": params.sources.as_dict() if params.sources else None},
        counts=counts, vocabularies=stats.vocabularies, files=DatasetFiles(dataset, LABELS, QUARANTINE),
        image_policy=IMAGE_POLICY, run=run)


def _counts(rows_in: int, quarantine: list[QuarantineRow], stats: LabelStats, by_split: dict[str, int],
            converted: int) -> DatasetCounts:
    kept = sum(by_split.values())
    if rows_in != kept + len(quarantine):
        raise RuntimeError(f"row accounting broken: {rows_in} in != {kept} kept + {len(quarantine)} quarantined")
    return DatasetCounts(
        rows_in=rows_in, rows_kept=kept, rows_quarantined=len(quarantine),
        quarantined_by_reason=dict(sorted(Counter(r[2] for r in quarantine).items())),
        rows_by_split=by_split, images_converted=converted,
        labels_missing={t: kept - sum(c.values()) for t, c in stats.counts.items()},
        labels_masked_rare=stats.rare)


def _stage(files: list[CatalogFile], params: IngestParams, staging: str,
           workers: int) -> tuple[int, int, list[QuarantineRow]]:
    rules = RowRules(params.tasks, params.limits, params.label_map)
    rows_in, converted, quarantine = stage(files, rules, staging, workers, params.batch_rows, params.sources)
    promised = sum(f.rows for f in files)
    if rows_in != promised:
        raise RuntimeError(f"read {rows_in} rows but the catalog footers promise {promised}")
    return rows_in, converted, quarantine


def ingest(catalog_uri: str, tasks: Sequence[str] | str, out_uri: str, *,
           splits: Sequence[float] = (0.8, 0.1, 0.1), min_class_count: int = 5,
           label_map: dict[str, dict[str, str]] | None = None, limits: ImageLimits = DEFAULT_LIMITS,
           workers: int | None = None, batch_rows: int = 512, row_group_rows: int = 1024,
           rows_per_part: int = 20_000, image_roots: Sequence[str] | None = None,
           image_hosts: Sequence[str] | None = None) -> dict[str, Any]:
    """Ingest a catalog (file, folder or glob; any fsspec URI) into a dataset at `out_uri`; the manifest as
    written (JSON: `DatasetManifest.to_dict()`).

    Raises CatalogError (before writing anything) when a catalog file cannot be used at all. `workers`:
    processes that decode images (None: one per core for catalogs of 5000+ rows, else none).
    `image_roots`, `image_hosts`: what `image_uri` rows may read besides the catalog's own folder
    (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`; see pipeline.io.image_sources).
    """
    started = time.perf_counter()
    params = IngestParams(check_tasks(tasks), check_splits(splits), int(min_class_count),
                          {k: dict(v) for k, v in (label_map or {}).items()}, limits,
                          batch_rows, row_group_rows, rows_per_part)
    unknown = set(params.label_map) - set(params.tasks)
    if unknown:
        raise ValueError(f"label_map names tasks {sorted(unknown)} that are not in {params.tasks}")
    files = scan(catalog_uri, params.tasks)
    params = dataclasses.replace(params, sources=image_sources.for_catalog(catalog_uri, image_roots, image_hosts,
                                                                           limits.max_bytes))
    n_workers = auto_workers(workers, sum(f.rows for f in files))
    log.info("ingest %s (%d files, %d rows) -> %s with %d workers", catalog_uri, len(files),
             sum(f.rows for f in files), out_uri, n_workers)
    with tempfile.TemporaryDirectory(prefix="cmaclip-ingest-") as tmp:
        staging = os.path.join(tmp, "staging.parquet")
        rows_in, converted, quarantine = _stage(files, params, staging, n_workers)
        con = _connect(tmp)
        duplicates, by_split, stats = decide(con, staging, params)
        quarantine += duplicates
        counts = _counts(rows_in, quarantine, stats, by_split, converted)
        _clear(out_uri)
        schema = dataset_schema(params.tasks, {"cmaclip.format": FORMAT,
                                               "cmaclip.input_fingerprint": fingerprint(files)})
        dataset = write_dataset(con, staging, out_uri, schema, stats.rare, params)
        con.close()
    verify_counts(out_uri, dataset, by_split)
    write_quarantine(storage.join(out_uri, QUARANTINE), quarantine)
    storage.write_json(storage.join(out_uri, LABELS), labels_document(stats))
    seconds = time.perf_counter() - started
    run = IngestRun(datetime.now(timezone.utc).isoformat(timespec="seconds"), round(seconds, 3),
                    round(rows_in / max(seconds, 1e-9), 1), n_workers)
    manifest = _manifest(catalog_uri, files, params, counts, stats, dataset, run)
    manifest.write(storage.join(out_uri, MANIFEST))
    log.info("ingest done: %d kept, %d quarantined in %.1fs", counts.rows_kept, counts.rows_quarantined, seconds)
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
