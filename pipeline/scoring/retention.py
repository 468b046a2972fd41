"""What publish keeps under the output folder, and removing the rest, so storage and the cost of a publish
follow the catalog, not the number of nights. Run at the end of every publish.

Kept: the last `versions` published versions, and always the current one and the one before it (rollback);
the runs those versions were published from, and the last `runs` finalized runs besides (a run the gate
stopped stays to be looked at or published with force). A finalized run not kept is removed whole: its
manifest first (from then on it is not a finalized run), then its report, done markers, prediction and
quarantine files. A run that never finalized (a failed night), and a plan's side files no kept run uses,
are removed once nothing of theirs was written for `orphan_days`, longer than any retried night, so a run
still in progress is never touched.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..io import storage
from ..manifests import PublishedVersion
from . import versions
from .finalize import read_run_manifests
from .layout import plan_uri, run_id_of, run_places, version_folder, version_uri

DAY_S = 86_400.0


@dataclass(frozen=True)
class Retention:
    versions: int = 7          # CMACLIP_PUBLISH_KEEP
    runs: int = 2              # CMACLIP_KEEP_RUNS: finalized runs kept besides those of kept versions
    orphan_days: float = 7.0   # CMACLIP_ORPHAN_DAYS: age of an unfinalized run or unused plan to remove

    def __post_init__(self) -> None:
        if self.versions < 1 or self.runs < 0 or self.orphan_days < 0:
            raise ValueError(f"retention keeps at least 1 version, >= 0 runs and orphans >= 0 days: {self}")

    @classmethod
    def from_env(cls, versions: int | None = None) -> "Retention":
        """The settings from the environment; `versions` (a caller's `keep`) overrides its variable."""
        env = os.environ.get
        keep = versions if versions is not None else int(env("CMACLIP_PUBLISH_KEEP") or cls.versions)
        return cls(versions=keep,
                   runs=int(env("CMACLIP_KEEP_RUNS") or cls.runs),
                   orphan_days=float(env("CMACLIP_ORPHAN_DAYS") or cls.orphan_days))


def prune(out: str, retention: Retention, now: float | None = None) -> dict[str, Any]:
    """Remove what `retention` does not keep under `out`; what was removed."""
    kept, removed_versions = _prune_versions(out, retention.versions)
    manifests = sorted(read_run_manifests(out), key=lambda m: m.finalized_at)
    keep = {v.run_id for v in kept} | {m.run_id for m in manifests[len(manifests) - retention.runs:]}
    removed_runs = [m.run_id for m in manifests if m.run_id not in keep]
    for run_id in removed_runs:
        _remove(run_places(out, run_id))
    cutoff = (time.time() if now is None else now) - retention.orphan_days * DAY_S
    finalized = {m.run_id for m in manifests}
    orphans = [r for r in _runs_on_storage(out) - finalized if _older(run_places(out, r), cutoff)]
    for run_id in orphans:
        _remove(run_places(out, run_id))
    used = {m.plan_id for m in manifests if m.run_id in keep}
    plans = [uri for uri in storage.glob(plan_uri(out, "*"))
             if uri.rsplit("plan=", 1)[-1] not in used and _older([uri], cutoff)]
    _remove(plans)
    return {"versions": removed_versions, "runs": removed_runs, "unfinalized_runs": sorted(orphans),
            "plans": [uri.rsplit("plan=", 1)[-1] for uri in plans]}


def _prune_versions(out: str, keep: int) -> tuple[list[PublishedVersion], list[int]]:
    """Remove every version folder but the last `keep` complete ones, the current and the one before it."""
    now = versions.current(out)
    complete = [n for n in versions.numbers(out) if versions.is_complete(out, n)]
    kept = set(complete[-keep:]) | ({now.version, now.previous} - {None} if now else set())
    removed = [n for n in versions.numbers(out) if n not in kept]
    for n in removed:
        storage.remove(version_uri(out, n, "version"))  # first: from now on the version does not exist
        storage.remove(version_folder(out, n), recursive=True)
    return [versions.read(out, n) for n in sorted(kept) if versions.is_complete(out, n)], removed


def _runs_on_storage(out: str) -> set[str]:
    """Every run with something under `out`: manifest, report, markers, predictions or quarantine."""
    return {run_id_of(uri) for pattern in run_places(out, "*") for uri in storage.glob(pattern)}


def _older(patterns: list[str], cutoff: float) -> bool:
    """Whether everything at `patterns` was last written before `cutoff` (a store that reports no
    modification time keeps it)."""
    times = [storage.newest_modification(uri) for pattern in patterns for uri in storage.glob(pattern)]
    return bool(times) and None not in times and max(times) < cutoff


def _remove(patterns: list[str]) -> None:
    """Remove what each pattern matches, in the order given."""
    for pattern in patterns:
        for uri in storage.glob(pattern):
            storage.remove(uri, recursive=True)
