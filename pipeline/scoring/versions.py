"""The published state, in versions. Each publish writes `published/versions/v=<n>/` (latest.parquet,
catalog.parquet when a catalog was given, version.json last: the version exists once its record does),
then copies those tables to `published/latest.parquet` and `catalog.parquet`, the current version, which
readers and incremental scoring open. Which version is current is written in the footer of latest.parquet
itself (`VERSION_KEY`), so the table and the answer are replaced together by one atomic write: there is
no pointer file to go stale, and a publish that fails halfway leaves the previous version current.
Rollback copies the previous version back, byte for byte.
"""
from __future__ import annotations

from typing import Any

from ..io import storage
from ..manifests import PublishedVersion
from .layout import published_uri, version_folder, version_uri

VERSION_KEY = "cmaclip.published_version"
TABLES = ("catalog", "latest")  # copied in this order: latest, which says which version is current, last


def metadata(version: int) -> dict[str, str]:
    """The schema metadata of a version's tables."""
    return {VERSION_KEY: str(version)}


def current_number(out: str) -> int | None:
    """The version latest.parquet is; None when nothing is published, or when it predates versions."""
    uri = published_uri(out, "latest")
    if not storage.exists(uri):
        return None
    value = (storage.parquet_file(uri).schema_arrow.metadata or {}).get(VERSION_KEY.encode())
    return None if value is None else int(value)


def read(out: str, version: int) -> PublishedVersion:
    return PublishedVersion.read(version_uri(out, version, "version"))


def current(out: str) -> PublishedVersion | None:
    number = current_number(out)
    return None if number is None else read(out, number)


def numbers(out: str) -> list[int]:
    """Every version folder under `out`, complete (with its record) or left by a failed publish."""
    found = (uri.rstrip("/").rsplit("/v=", 1)[-1] for uri in storage.glob(version_folder(out, "*")))
    return sorted(int(n) for n in found if n.isdigit())


def is_complete(out: str, version: int) -> bool:
    return storage.exists(version_uri(out, version, "version"))


def next_number(out: str) -> int:
    """One past every version folder, incomplete ones too: a number is never written twice."""
    return max(numbers(out), default=0) + 1


def point(out: str, record: PublishedVersion) -> None:
    """Make `record` the current version: its tables copied over the published ones (a table it lacks is
    removed, never left from another version), latest.parquet last."""
    for name in TABLES:
        target = published_uri(out, name)
        if name in record.files:
            storage.copy(version_uri(out, record.version, name), target)
        else:
            storage.remove(target)


def rollback(out: str) -> dict[str, Any]:
    """Make the version before the current one current again, exactly as it was published."""
    now = current(out)
    if now is None:
        raise ValueError(f"nothing versioned is published under {out}: there is nothing to roll back")
    if now.previous is None:
        raise ValueError(f"version {now.version} is the first published: there is no previous version")
    if not is_complete(out, now.previous):
        raise ValueError(f"version {now.previous}, before the current {now.version}, was removed")
    before = read(out, now.previous)
    point(out, before)
    return {"version": before.version, "rolled_back": now.version, "run_id": before.run_id,
            "latest": published_uri(out, "latest"),
            "catalog": published_uri(out, "catalog") if "catalog" in before.files else None}
