"""Score one shard: read it, run the forward pass (the rows whose prediction is carried over skip it), write
it, then its done marker, last. Idempotent: a shard whose matching marker exists is skipped, so a rerun
redoes only the shards that did not commit, in any order, on any worker. Also the model reference a shard is
scored with, and the run id it is scored under."""
from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..io import storage
from ..manifests import ShardLineage, ShardMarker, ShardTimings
from . import carry_over, duplicate_ids
from .layout import carry_uri, check_run_id, duplicates_uri, output_uris
from .planner import Shard, digest
from .predictor import Predictor
from .reader import batch_loader, default_workers
from .writer import ShardWriter, remove_stale_temps


def load_predictor(model: Any, *, precision: str = "auto", device: str = "cpu", compile: bool = False) -> Predictor:
    """A Predictor from a model reference: an object with `.predictor()` (a Predictor is one), or a local
    checkpoint folder, or a registry or run URI (`models:/name@alias`, `models:/name/3`, `runs:/id/path`)."""
    if hasattr(model, "predictor"):
        return model.predictor()
    ref = str(model)
    if ref.startswith(("models:/", "runs:/")):
        from ..tracking import registry  # MLflow is imported only when a registry reference is scored

        return registry.load_predictor(ref, precision=precision, device=device, compile=compile)
    if "://" in ref and not ref.startswith("file://"):
        raise ValueError(f"model {ref!r}: only local checkpoint folders are supported; fetch it first")
    path = Path(ref.removeprefix("file://"))
    if not (path / "cmaclip.json").is_file():
        raise FileNotFoundError(f"model {ref!r} is not a cmaclip checkpoint folder (no cmaclip.json)")
    return Predictor.from_checkpoint(path, precision=precision, device=device, compile=compile)


def default_run_id(plan_id: str, predictor: Predictor, explain: bool = False) -> str:
    """Same input snapshot + same model (+ same output columns) -> same run, so rerunning a command resumes
    it. `explain` adds columns, so it makes another run; off, it leaves the id as it was before it existed."""
    return digest(plan_id, predictor.lineage.name, predictor.lineage.version, *(["explain"] if explain else []))[:16]


def _matching_marker(uri: str, lineage: ShardLineage) -> ShardMarker | None:
    """The shard's marker if this exact work (plan, shard, model, columns) is committed; None if it must run."""
    if not storage.exists(uri):
        return None
    marker = ShardMarker.read(uri)
    if marker.work() != lineage.work():
        raise ValueError(f"{uri} records plan {marker.plan_id} / model {marker.model_name}:{marker.model_version}"
                         f" / explain {marker.explain}, not plan {lineage.plan_id} / {lineage.model_name}:"
                         f"{lineage.model_version} / explain {lineage.explain}: use another run id")
    outputs = [marker.predictions] + ([marker.quarantine] if marker.quarantine else [])
    return marker if all(storage.exists(u) for u in outputs) else None


def _shard_lineage(shard: Shard, predictor: Predictor, run_id: str, explain: bool) -> ShardLineage:
    return ShardLineage(**predictor.lineage.as_dict(), run_id=run_id, plan_id=shard.plan_id, shard=shard.id,
                        input_fingerprint=shard.input_fingerprint, precision=predictor.precision, explain=explain)


def score_shard(shard: Shard | dict, model: Any, out: str, *, run_id: str | None = None, batch_size: int = 32,
                workers: int | None = None, precision: str = "auto", compile: bool = False,
                progress: Callable[[int], None] | None = None, explain: bool = False) -> dict[str, Any]:
    """Score one shard and commit it: predictions Parquet, quarantine Parquet (if any), then the done
    marker. Skips the shard if its matching marker exists. Returns the marker (with `skipped`).
    `explain`: add each task's title and image contributions (`cmaclip.explain`; 3 forward passes)."""
    shard = Shard.from_dict(shard) if isinstance(shard, dict) else shard
    predictor = load_predictor(model, precision=precision, compile=compile)
    run_id = check_run_id(run_id or default_run_id(shard.plan_id, predictor, explain))
    uris = output_uris(out, shard.id, predictor.lineage.name, predictor.lineage.version, run_id)
    lineage = _shard_lineage(shard, predictor, run_id, explain)
    done = _matching_marker(uris["marker"], lineage)
    if done is not None:
        if progress:
            progress(shard.rows)
        return {**done.to_dict(), "skipped": True}
    remove_stale_temps(uris["predictions"])
    workers = default_workers(predictor.device) if workers is None else workers
    marker = _run_shard(shard, predictor, uris, lineage, batch_size, workers, progress,
                        _shard_duplicates(out, shard), _shard_carry(out, shard))
    marker.write(uris["marker"])  # last: the shard counts as done only from here
    return {**marker.to_dict(), "skipped": False}


def _shard_duplicates(out: str, shard: Shard) -> dict[tuple[str, int], str]:
    if not shard.duplicates:
        return {}
    uri = duplicates_uri(out, shard.plan_id)
    if not storage.exists(uri):  # scoring on would publish one row's prediction for every row of its id
        raise FileNotFoundError(f"plan {shard.plan_id} found {shard.duplicates} rows of duplicated product_ids "
                                f"but {uri} is missing: plan with plan_shards(..., out={out!r})")
    return duplicate_ids.for_shard(uri, shard.id)


def _shard_carry(out: str, shard: Shard) -> carry_over.ShardCarry:
    if not shard.carry:
        return carry_over.NOTHING
    uri = carry_uri(out, shard.plan_id)
    if not storage.exists(uri):  # scoring on would give a run that misses the carried products
        raise FileNotFoundError(f"plan {shard.plan_id} carries {shard.carry} rows of shard {shard.id} over, but {uri} "
                                f"is missing: plan with plan_shards(..., out={out!r})")
    return carry_over.for_shard(uri, shard.id)


def _run_shard(shard: Shard, predictor: Predictor, uris: dict[str, str], lineage: ShardLineage, batch_size: int,
               workers: int, progress: Callable[[int], None] | None, duplicates: dict[tuple[str, int], str],
               carry: carry_over.ShardCarry) -> ShardMarker:
    started, scored_at = time.perf_counter(), datetime.now(timezone.utc)
    loader = batch_loader(shard, predictor.preprocessor, batch_size, workers,
                          pin_memory=predictor.device.type == "cuda", duplicates=duplicates, carry=carry.hashes)
    rows_in, waited, forward = 0, 0.0, 0.0
    with ShardWriter(uris, predictor, lineage, scored_at) as writer:
        tick = time.perf_counter()
        for batch in loader:
            t0 = time.perf_counter()
            waited += t0 - tick
            columns = predictor.predict(batch.pixels, batch.tokens, lineage.explain)
            tick = time.perf_counter()
            forward += tick - t0
            writer.add(batch.product_ids, batch.content_hashes, columns, batch.quarantine)
            writer.carry(carry.take(batch.carried))
            rows_in += batch.rows_in
            if progress:
                progress(batch.rows_in)
    if rows_in != shard.rows:
        raise RuntimeError(f"shard {shard.id}: read {rows_in} rows, the plan says {shard.rows}")
    total = time.perf_counter() - started
    timings = ShardTimings(total_s=round(total, 3), forward_s=round(forward, 3), wait_s=round(waited, 3),
                           rows_per_s=round(rows_in / max(total, 1e-9), 2))
    return ShardMarker(
        **lineage.to_dict(), rows_in=rows_in, predicted=writer.predicted, scored=writer.scored,
        carried=writer.carried, quarantined=len(writer.quarantine),
        reasons=dict(Counter(r[2] for r in writer.quarantine)), predictions=uris["predictions"],
        quarantine=uris["quarantine"] if writer.quarantine else None, batch_size=batch_size, workers=workers,
        scored_at=scored_at.isoformat(), timings=timings)
