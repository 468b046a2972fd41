"""Where a scoring run's files go under `out`, and what may name a run. Hive-style partitions, readable by
pyarrow.dataset, DuckDB and Spark; a shard's paths are a function of (input snapshot, shard id, model
version, run), so a rerun finds what an earlier attempt committed:

    predictions/model=<name>/version=<v>/run=<id>/shard-<id>.parquet
    quarantine/model=<name>/version=<v>/run=<id>/shard-<id>.parquet   (only shards that quarantined rows)
    _markers/run=<id>/shard-<id>.json                                  (done markers, written last)
    _manifests/run=<id>.json                                           (finalize: the run is complete)
    _plans/plan=<id>/duplicates.parquet                                (plan: rows of duplicated product_ids)
    _plans/plan=<id>/carry.parquet                                     (plan: rows carried over, incremental)
    _reports/run=<id>/report.json, summary.md, fill.parquet, disagreements.parquet   (report: `report_uri`)
    published/versions/v=<n>/latest.parquet, catalog.parquet, version.json          (publish: `version_uri`)
    published/latest.parquet, published/catalog.parquet                (the current version: `published_uri`)
"""
from __future__ import annotations

import re
from urllib.parse import quote

from ..io import storage

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ROW_GROUP_ROWS = 16_384   # rows per Parquet row group of the predictions, the published tables and the reports


def _partition(name: str, version: str, run_id: str) -> str:
    # Hive escapes partition values the same way: '/' or '=' in a model name must not create folders.
    return f"model={quote(name, safe='-_.')}/version={quote(version, safe='-_.')}/run={run_id}"


def output_uris(out: str, shard_id: str, name: str, version: str, run_id: str) -> dict[str, str]:
    part, file = _partition(name, version, run_id), f"shard-{shard_id}.parquet"
    return {"predictions": storage.join(out, "predictions", part, file),
            "quarantine": storage.join(out, "quarantine", part, file),
            "marker": marker_uri(out, run_id, shard_id)}


def marker_uri(out: str, run_id: str, shard_id: str) -> str:
    return storage.join(out, "_markers", f"run={run_id}", f"shard-{shard_id}.json")


def run_places(out: str, run_id: str) -> list[str]:
    """Everything a run writes, as glob patterns (a run_id of `*` matches every run): its manifest first,
    so a run being removed stops counting as finalized before any of its files go."""
    return [manifest_uri(out, run_id), report_uri(out, run_id), storage.join(out, "_markers", f"run={run_id}"),
            storage.join(out, "predictions", "*", "*", f"run={run_id}"),
            storage.join(out, "quarantine", "*", "*", f"run={run_id}")]


def run_id_of(uri: str) -> str:
    """The run a path of `run_places` belongs to."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.removeprefix("run=").removesuffix(".json")


def manifest_uri(out: str, run_id: str) -> str:
    return storage.join(out, "_manifests", f"run={run_id}.json")


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (it becomes a path)")
    return run_id


def published_uri(out: str, name: str) -> str:
    """What publish writes: `latest` (one row per product, the current published state), `catalog`."""
    return storage.join(out, "published", f"{name}.parquet")


def versions_uri(out: str) -> str:
    """The folder of the published versions, one `v=<n>` folder each."""
    return storage.join(out, "published", "versions")


def version_folder(out: str, version: int | str) -> str:
    """The folder of published version `version` (`*` matches every version)."""
    return storage.join(versions_uri(out), f"v={version}")


def version_uri(out: str, version: int, name: str) -> str:
    """A file of published version `version`: `latest`, `catalog` (Parquet) or `version` (its record)."""
    suffix = "json" if name == "version" else "parquet"
    return storage.join(version_folder(out, version), f"{name}.{suffix}")


def report_uri(out: str, run_id: str, name: str = "") -> str:
    """A file of a run's report (`report.json`, `summary.md`, `fill.parquet`, `disagreements.parquet`), or
    with no name its folder."""
    folder = storage.join(out, "_reports", f"run={run_id}")
    return storage.join(folder, name) if name else folder


def plan_uri(out: str, plan_id: str) -> str:
    """The folder of a plan's side files (`*` matches every plan)."""
    return storage.join(out, "_plans", f"plan={plan_id}")


def duplicates_uri(out: str, plan_id: str) -> str:
    return storage.join(plan_uri(out, plan_id), "duplicates.parquet")


def carry_uri(out: str, plan_id: str) -> str:
    return storage.join(plan_uri(out, plan_id), "carry.parquet")
