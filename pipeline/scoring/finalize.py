"""Finalize a scoring run: check that every shard of the plan is committed and that its rows reconcile, then
write the run manifest, the mark of a complete run (the only runs publish reads)."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import Any

from .. import reasons
from ..contracts import CONTRACT
from ..io import storage
from ..manifests import RunManifest, ShardMarker
from .carry_over import decided_at_plan
from .layout import check_run_id, manifest_uri, marker_uri
from .planner import Plan, Shard


class RunIncomplete(RuntimeError):
    """finalize found shards that are missing or whose counts do not reconcile; `problems` lists them."""

    def __init__(self, run_id: str, problems: list[str]):
        super().__init__(f"run {run_id} is not complete: " + "; ".join(problems[:20])
                         + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))
        self.problems = problems


def _parquet_rows(uri: str | None) -> int:
    return 0 if uri is None else storage.parquet_file(uri).metadata.num_rows


def _scored(marker: ShardMarker) -> int:
    return marker.predicted - marker.carried if marker.scored is None else marker.scored  # None: an older marker


def _carry_problems(shard: Shard, marker: ShardMarker) -> list[str]:
    """predicted = scored + carried, and the carried rows are the plan's (at most its candidates, when the
    shard decided after fetching the images)."""
    problems = []
    if marker.predicted != _scored(marker) + marker.carried:
        problems.append(f"shard {shard.id}: predicted {marker.predicted} != scored {_scored(marker)} "
                        f"+ carried {marker.carried}")
    exact = decided_at_plan(shard.image_column)
    if marker.carried > shard.carry or (exact and marker.carried != shard.carry):
        problems.append(f"shard {shard.id}: {marker.carried} rows carried over, the plan "
                        f"{'has' if exact else 'has at most'} {shard.carry}")
    return problems


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
    problems += _carry_problems(shard, marker)
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
    shard (against the files' own row counts) and in total, that predicted = scored + carried over with the
    plan's carried rows, and that every row of a duplicated product_id was quarantined as one; then write
    the run manifest. Idempotent: an existing manifest for the same run is returned unchanged."""
    plan = Plan.from_dict(plan) if isinstance(plan, dict) else plan
    check_run_id(run_id)
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
    uri = marker_uri(out, run_id, shard.id)
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
        predicted=sum(m.predicted for m in markers), scored=sum(_scored(m) for m in markers),
        carried=sum(m.carried for m in markers), quarantined=sum(m.quarantined for m in markers),
        reasons=dict(sorted(reasons_total.items())), predictions=[m.predictions for m in markers],
        quarantine=[m.quarantine for m in markers if m.quarantine],
        scoring_seconds=round(sum(m.timings.total_s for m in markers), 3),
        finalized_at=datetime.now(timezone.utc).isoformat())


def read_run_manifests(out: str) -> list[RunManifest]:
    """Every finalized run under `out`, each manifest checked (`manifests.ManifestError` names a bad one)."""
    return [RunManifest.read(u) for u in storage.list_files(storage.join(out, "_manifests"), ".json")]
