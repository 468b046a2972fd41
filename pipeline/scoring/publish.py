"""Publish a finalized run as the new version of the published state: the run's predictions, one row per
product of the current catalog (`published/latest.parquet`), and given the catalog, the catalog joined with
them (`catalog.parquet`). Only the newest run is read, never the runs before it: its prediction files cover
the whole catalog (rescored rows and rows carried over), so a publish costs O(catalog) whatever the
history, and a product deleted from the catalog leaves the state. Before it writes, the run's report is
made (`report`) and, given limits, the quality gate checks it (`gate`); after, `retention` removes what is
no longer kept. Versions, the current one and rollback: `versions`."""
from __future__ import annotations

import logging
import tempfile
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from ..io import storage
from ..io.allocator import returning_freed_memory
from ..io.sql import connect, load_sql, scratch_root, write_parquet
from ..manifests import PublishedVersion, RunManifest, RunReport
from . import duplicate_ids, published_tables, report, versions
from .finalize import read_run_manifests
from .gate import GateFailed, Limits, Verdict, check
from .layout import ROW_GROUP_ROWS, check_run_id, manifest_uri, published_uri, report_uri, version_uri
from .retention import Retention, prune

CATALOG_PREFIX = "catalog_"        # a catalog column named like a prediction column gets this prefix


def _query(con: Any, name: str, params: dict[str, Any]) -> pa.RecordBatchReader:
    return con.sql(load_sql(name), params=params).to_arrow_reader(ROW_GROUP_ROWS)


def run_manifest(out: str, run_id: str | None = None) -> RunManifest:
    """The manifest of run `run_id`, or of the newest finalized run under `out` (by `finalized_at`)."""
    if run_id is not None:
        uri = manifest_uri(out, check_run_id(run_id))
        if not storage.exists(uri):
            raise FileNotFoundError(f"run {run_id} has no manifest under {out}: it is not finalized")
        return RunManifest.read(uri)
    manifests = read_run_manifests(out)
    if not manifests:
        raise FileNotFoundError(f"no finalized scoring run under {out}: run score and finalize first")
    return max(manifests, key=lambda m: m.finalized_at)


def publish(out: str, catalog: str | None = None, *, run_id: str | None = None, limits: Limits | None = None,
            force: bool = False, keep: int | None = None) -> dict[str, Any]:
    """Publish run `run_id` (default: the newest finalized run under `out`) as a new version and make it
    current; with `catalog`, the catalog joined with it too. With `limits`, the quality gate checks the
    run's report first and a run over a limit raises `GateFailed` unless `force`. Then keeps the last
    `keep` versions (default `CMACLIP_PUBLISH_KEEP`, 7) and the runs retention keeps. Publishing the run
    (and catalog) that is already current writes nothing new."""
    manifest = run_manifest(out, run_id)
    retention = Retention.from_env(keep)
    now = versions.current(out)
    if now is not None and (now.run_id, now.catalog) == (manifest.run_id, catalog):
        return _summary(out, now, None, prune(out, retention))
    with returning_freed_memory():  # memory flat whatever the catalog's size (pipeline/io/allocator.py)
        made = report.build(out, manifest, catalog)
        verdict = check(made, manifest, limits) if limits is not None else None
        if verdict is not None and not verdict.passed and not force:
            raise GateFailed(verdict)
        record = _write_version(out, manifest, catalog, verdict, now)
    versions.point(out, record)
    return _summary(out, record, verdict, prune(out, retention))


def _write_version(out: str, manifest: RunManifest, catalog: str | None, verdict: Verdict | None,
                   previous: PublishedVersion | None) -> PublishedVersion:
    """Write the version's tables, then its record (the version exists once the record does)."""
    number = versions.next_number(out)
    latest = version_uri(out, number, "latest")
    with connect() as con, tempfile.TemporaryDirectory(prefix="cmaclip-publish-", dir=scratch_root()) as sorts:
        storage.register_duckdb(con, out)
        predictions = published_tables.run_predictions(con, manifest.predictions)
        rows = write_parquet(published_tables.latest(predictions, sorts), latest, versions.metadata(number),
                             ROW_GROUP_ROWS)
        _check_rows(manifest, rows)
        joined = _publish_catalog(con, catalog, latest, version_uri(out, number, "catalog"),
                                  versions.metadata(number), sorts) if catalog else {}
    record = PublishedVersion(
        version=number, run_id=manifest.run_id, model_name=manifest.model_name,
        model_version=manifest.model_version, rows=rows, files=["latest", "catalog"] if joined else ["latest"],
        catalog=catalog, catalog_rows=joined.get("catalog_rows"), renamed=joined.get("renamed", {}),
        previous=previous.version if previous else None, report=report_uri(out, manifest.run_id, "report.json"),
        gate_passed=None if verdict is None else verdict.passed,
        gate_exceeded=list(verdict.exceeded) if verdict else [], forced=bool(verdict and not verdict.passed),
        created_at=datetime.now(timezone.utc).isoformat())
    record.write(version_uri(out, number, "version"))
    return record


def _check_rows(manifest: RunManifest, rows: int) -> None:
    """Every row of the run's files is in the state: none was one product's second prediction."""
    expected = sum(storage.parquet_file(f).metadata.num_rows for f in manifest.predictions)
    if rows != expected:
        raise RuntimeError(f"run {manifest.run_id}: its prediction files hold {expected} rows but "
                           f"{rows} products; a product_id has several predictions, nothing was published")


def _summary(out: str, record: PublishedVersion, verdict: Verdict | None, removed: dict) -> dict[str, Any]:
    made = RunReport.read(record.report)
    return {"version": record.version, "previous": record.previous, "run_id": record.run_id,
            "products": record.rows, "latest": published_uri(out, "latest"),
            "catalog": published_uri(out, "catalog") if "catalog" in record.files else None,
            "catalog_rows": record.catalog_rows, "renamed": record.renamed, "report": record.report,
            "summary": made.files["summary"], "verdict": verdict.to_dict() if verdict else None,
            "forced": record.forced, "removed": removed}


def _publish_catalog(con: Any, catalog: str, latest: str, view: str, metadata: dict[str, str],
                     sorts: str) -> dict[str, Any]:
    """The catalog view (`published_tables.catalog_view`): the catalog's rows (queries/publish_catalog_rows.sql,
    keyed by the scoring rule: `duplicate_ids.register_key`) with the new state's columns, prefixed
    `predicted_` (`published_tables.predicted`); catalog columns named like a prediction column are renamed
    (`_unique_names`). `sorts`: a local folder for the sorted runs."""
    storage.register_duckdb(con, catalog)
    files = storage.parquet_files(catalog)
    columns = con.sql(load_sql("publish_catalog_columns"), params={"catalog": files})
    duplicate_ids.register_key(con, str(dict(zip(columns.columns, columns.types)).get("product_id", "")))
    rows = _query(con, "publish_catalog_rows", {"catalog": files})
    state = published_tables.predicted(latest)
    names, renamed = _unique_names(published_tables.column_names(rows.schema, state.schema))
    if renamed:
        logging.getLogger(__name__).warning("publish: catalog columns %s are named like prediction columns; "
                                            "published as %s", sorted(renamed), sorted(renamed.values()))
    reader = published_tables.catalog_view(rows, state, names, sorts)
    return {"catalog": view, "catalog_rows": write_parquet(reader, view, metadata, ROW_GROUP_ROWS), "renamed": renamed}


def _unique_names(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The catalog view has the catalog's columns first, then the `predicted_` ones. A catalog column with a
    prediction column's name (say, the catalog keeps predictions of its own) would make two columns of one
    name, a file no reader accepts: it is published as `catalog_<name>` (prefixed again while taken)."""
    unique, taken, renamed = list(names), set(names), {}
    for i, name in enumerate(names):
        if name in names[i + 1:]:
            alias = CATALOG_PREFIX + name
            while alias in taken:
                alias = CATALOG_PREFIX + alias
            unique[i], renamed[name] = alias, alias
            taken.add(alias)
    return unique, renamed
