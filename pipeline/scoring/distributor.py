"""The local distributor: plan, score every shard (or one) in this process, one after another, and finalize
a complete run; what `cmaclip score` runs. The Airflow DAG is the other distributor: one mapped task per
group of shards (`orchestration.airflow_tasks`), over the same plan, runner and finalize."""
from __future__ import annotations

import time
from typing import Any

import torch

from . import carry_over
from .finalize import finalize
from .layout import check_run_id, manifest_uri
from .planner import plan_shards
from .runner import default_run_id, load_predictor, score_shard


def score(catalog: str, model: Any, out: str, shard: str | None = None, all: bool = True,
          rows_per_shard: int = 10_000, batch_size: int = 32, workers: int | None = None, precision: str = "auto",
          device: str = "cpu", compile: bool = False, run_id: str | None = None, threads: int | None = None,
          progress: bool = True, image_roots: list[str] | None = None,
          image_hosts: list[str] | None = None, explain: bool = False, full: bool = False) -> dict[str, Any]:
    """Plan, score one shard (`shard=ID`) or every shard (`all`), and finalize a complete run. Reruns
    resume: committed shards are skipped. Returns a summary dict, with the rows scored and carried over.
    `explain`: see `score_shard`. Incremental by default: a product whose content and model are those of its
    published prediction carries it over (pipeline/scoring/carry_over.py); `full` scores every row.
    `device`: cpu, cuda, cuda:N or auto (cuda where available; `cmaclip.precision.resolve_device`).

    `threads` sets torch's intra-op threads for this process. On a node shared with other busy processes,
    fewer threads than cores can be much faster: OpenMP threads wait for each other at every op, and a
    descheduled one stalls them all. `image_roots`, `image_hosts`: see `plan_shards`."""
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    if shard is None and not all:
        raise ValueError("nothing to score: give shard=ID or all=True")
    # The model loads before the plan: which predictions the plan carries over depends on it.
    predictor = load_predictor(model, precision=precision, device=device, compile=compile)
    carry_from = None if full else carry_over.source(out, predictor.lineage.name, predictor.lineage.version,
                                                     predictor.tasks, explain)
    plan = plan_shards(catalog, rows_per_shard, image_roots, image_hosts, out=out, carry_from=carry_from)
    shards = [plan.shard(shard)] if shard is not None else plan.shards
    run_id = check_run_id(run_id or default_run_id(plan.id, predictor, explain))
    bar = tqdm(total=sum(s.rows for s in shards), unit="row", desc=f"score {run_id}", disable=not progress)
    markers = []
    with bar:
        for s in shards:
            markers.append(score_shard(s, predictor, out, run_id=run_id, batch_size=batch_size,
                                       workers=workers, progress=bar.update, explain=explain))
    total = lambda key: sum(m[key] or 0 for m in markers)  # noqa: E731
    summary = {"run_id": run_id, "plan_id": plan.id, "plan": plan.counts(), "shards": len(plan.shards),
               "shards_run": len(markers), "skipped": sum(m["skipped"] for m in markers),
               "rows_in": total("rows_in"), "predicted": total("predicted"), "scored": total("scored"),
               "carried": total("carried"), "quarantined": total("quarantined"),
               "model_name": predictor.lineage.name, "model_version": predictor.lineage.version,
               "precision": predictor.precision, "device": str(predictor.device), "explain": explain,
               "seconds": round(time.perf_counter() - started, 3)}
    if shard is None:
        summary["manifest"] = manifest_uri(out, run_id)
        finalize(plan, out, run_id)
    return summary
