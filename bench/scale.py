"""How the pipeline's steps grow with the catalog: rows/s and peak memory at 1x and 5x the catalog.

    python bench/scale.py [--rows 20193] [--factor 5] [--rows-per-shard 10000] [--threads N] [--work-dir DIR]

The catalog is fashion-small (or its first --rows rows; the synthetic catalog when it is absent), and the
same replicated --factor times with new product ids and the same images. On each: ingest with 1 and with 2
worker processes, plan the scoring, score every shard with the tiny config (random weights, heads fitted as
in bench/scoring.py), finalize and publish (with the catalog joined). Each step runs in a fresh process,
which reports its rows/s (the step's own time, not the interpreter's start), its peak RSS (its own and its
worker processes': staging, part writing) and the CPU seconds it used: on a machine other jobs load, rows/s
says how much CPU a step got, CPU seconds what it needed. Each step runs at both sizes in turn, so a change
in the load hits both alike. The targets: peak RSS at 5x within 10% of 1x for every step; rows/s at 5x at
least 0.9x of 1x; ingest on 2 workers at least 1.6x the rows/s of 1 worker (on 2 cores). Ends with one JSON
line with every figure. The default (fashion-small, 20,193 and 100,965 rows) took 7.3 minutes on 2 loaded
cores with `--threads 1`; `--rows` cuts the base catalog.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
FASHION_SMALL = REPO.parent / "shared" / "data" / "fashion-small" / "products.parquet"
STEPS = ("ingest_1", "ingest_2", "plan", "score", "finalize", "publish")
TARGETS = {"rss_growth": 0.10, "rate_ratio": 0.9, "ingest_speedup": 1.6}


# --- set-up (parent) ---------------------------------------------------------------------------------------

def make_catalogs(rows: int | None, factor: int, work: Path) -> tuple[str, dict[int, str]]:
    """fashion-small's first `rows` rows (all by default) as the 1x catalog, and `factor` copies of it with
    new product ids (`<id>~<copy>`) and the same images as the big one; both in row groups of 2048."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if FASHION_SMALL.is_file():
        source, table = "fashion-small", pq.read_table(FASHION_SMALL)
    else:
        from pipeline.synthetic import make_catalog
        make_catalog(rows or 2000, str(work / "synthetic.parquet"), seed=0)
        source, table = "synthetic", pq.read_table(work / "synthetic.parquet")
    table = table.slice(0, rows) if rows else table
    paths = {1: work / "catalog-1x.parquet", factor: work / f"catalog-{factor}x.parquet"}
    pq.write_table(table, paths[1], row_group_size=2048, compression="zstd")
    with pq.ParquetWriter(paths[factor], table.schema, compression="zstd") as writer:
        for copy in range(factor):
            ids = table.column("product_id") if copy == 0 else pc.binary_join_element_wise(
                table.column("product_id"), pa.scalar(str(copy)), "~")
            writer.write_table(table.set_column(0, "product_id", ids), row_group_size=2048)
    return source, {size: str(path) for size, path in paths.items()}


def setup(args: argparse.Namespace) -> dict:
    """The catalogs and the checkpoint, in a child of their own: the parent stays small, and the steps'
    processes start small (Linux carries a parent's peak RSS over to its children's ru_maxrss)."""
    from scoring import make_checkpoint

    work = Path(args.work_dir)
    source, catalogs = make_catalogs(args.rows, args.factor, work)
    tasks = make_checkpoint("tiny", catalogs[1], work / "ckpt")
    return {"source": source, "catalogs": catalogs, "tasks": tasks, "checkpoint": str(work / "ckpt")}


def run_child(step: str, catalog: str, work: Path, args: argparse.Namespace) -> dict:
    """One step in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, __file__, "--child", step, "--catalog", catalog, "--work-dir", str(work),
           "--checkpoint", args.checkpoint, "--tasks", args.tasks, "--rows-per-shard", str(args.rows_per_shard),
           "--factor", str(args.factor), "--threads", str(args.threads or 0)]
    if args.rows:
        cmd += ["--rows", str(args.rows)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{step} on {catalog} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the steps (children) ------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU of this process and its joined workers: on a machine other jobs load, the wall
    clock says how much CPU the step got, this how much it needed."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime, 2)


def peak_rss_mb() -> dict[str, float]:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over exec) and the largest of its
    joined worker processes' (RUSAGE_CHILDREN, in KiB; a forked worker's counts the pages it shares)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as status:
        own = next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), own)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(own / 1024, 1), "worker_peak_rss_mb": round(workers / 1024, 1)}


def step_ingest(args: argparse.Namespace, workers: int) -> dict:
    from pipeline.ingest.dataset import ingest

    out = Path(args.work_dir) / f"dataset-{Path(args.catalog).stem}-{workers}"
    started = time.perf_counter()
    manifest = ingest(args.catalog, args.tasks, str(out), workers=workers)
    seconds = time.perf_counter() - started
    # Ingest returns without waiting for its worker processes to wind down: wait here, so that their CPU
    # seconds and peak RSS (RUSAGE_CHILDREN counts only children waited for) are in the figures.
    for child in multiprocessing.active_children():
        child.join()
    return {"rows": manifest["counts"]["rows_in"], "seconds": seconds}


def _predictions(args: argparse.Namespace) -> Path:
    return Path(args.work_dir) / f"predictions-{Path(args.catalog).stem}"


def step_plan(args: argparse.Namespace) -> dict:
    from pipeline.scoring import planner

    started = time.perf_counter()
    plan = planner.plan_shards(args.catalog, args.rows_per_shard, out=str(_predictions(args)))
    seconds = time.perf_counter() - started
    (_predictions(args) / "plan.json").write_text(plan.to_json())
    return {"rows": plan.rows, "seconds": seconds, "shards": len(plan.shards)}


def _plan(args: argparse.Namespace):
    from pipeline.scoring import planner

    return planner.Plan.from_json((_predictions(args) / "plan.json").read_text())


def step_score(args: argparse.Namespace) -> dict:
    import torch

    from pipeline.scoring import runner
    from pipeline.scoring.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor, plan = Predictor.from_checkpoint(args.checkpoint), _plan(args)
    run_id = runner.default_run_id(plan.id, predictor)
    (_predictions(args) / "run_id").write_text(run_id)
    started = time.perf_counter()
    for shard in plan.shards:
        runner.score_shard(shard, predictor, str(_predictions(args)), run_id=run_id)
    return {"rows": plan.rows, "seconds": time.perf_counter() - started, "precision": predictor.precision,
            "threads": torch.get_num_threads()}


def step_finalize(args: argparse.Namespace) -> dict:
    from pipeline.scoring.finalize import finalize

    plan, run_id = _plan(args), (_predictions(args) / "run_id").read_text()
    started = time.perf_counter()
    manifest = finalize(plan, str(_predictions(args)), run_id)
    return {"rows": manifest["rows_in"], "seconds": time.perf_counter() - started}


def step_publish(args: argparse.Namespace) -> dict:
    from pipeline.scoring.publish import publish

    started = time.perf_counter()
    published = publish(str(_predictions(args)), args.catalog)
    return {"rows": published["catalog_rows"], "seconds": time.perf_counter() - started}


def run_step(args: argparse.Namespace) -> dict:
    if args.child == "setup":
        return setup(args)
    steps = {"ingest_1": lambda: step_ingest(args, 1), "ingest_2": lambda: step_ingest(args, 2),
             "plan": lambda: step_plan(args), "score": lambda: step_score(args),
             "finalize": lambda: step_finalize(args), "publish": lambda: step_publish(args)}
    result = steps[args.child]()
    return {**result, "rows_per_s": round(result["rows"] / result["seconds"], 1),
            "seconds": round(result["seconds"], 2), "cpu_s": cpu_seconds(), **peak_rss_mb()}


# --- main ------------------------------------------------------------------------------------------------

def compare(small: dict, large: dict) -> dict:
    """Per step: peak RSS growth (the larger of the step's own and its workers') and the rows/s ratio."""
    out = {}
    for step in STEPS:
        peak = [max(r[step]["peak_rss_mb"], r[step]["worker_peak_rss_mb"]) for r in (small, large)]
        out[step] = {"rss_growth": round(peak[1] / peak[0] - 1, 4),
                     "rate_ratio": round(large[step]["rows_per_s"] / small[step]["rows_per_s"], 3)}
    return out


def verdicts(growth: dict, sizes: dict) -> dict:
    speedups = {size: round(r["ingest_2"]["rows_per_s"] / r["ingest_1"]["rows_per_s"], 3) for size, r in sizes.items()}
    return {"ingest_speedup_2_over_1": speedups,
            "rss_flat": {s: g["rss_growth"] <= TARGETS["rss_growth"] for s, g in growth.items()},
            "rate_kept": {s: g["rate_ratio"] >= TARGETS["rate_ratio"] for s, g in growth.items()},
            "ingest_speedup_met": {size: v >= TARGETS["ingest_speedup"] for size, v in speedups.items()}}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, help="rows of the 1x catalog (default: all of fashion-small, 20,193)")
    p.add_argument("--factor", type=int, default=5)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--work-dir", help="default: a temporary folder")
    # internal: one step in a child process
    p.add_argument("--threads", type=int, help="torch threads while scoring (default: torch's; on a machine other "
                                               "jobs load, 1 can be several times faster)")
    p.add_argument("--child", choices=("setup", *STEPS), help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--tasks", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(run_step(args)))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir, args.checkpoint, args.tasks = str(work), "", ""
    made = run_child("setup", "", work, args)
    source, tasks, args.checkpoint = made["source"], made["tasks"], made["checkpoint"]
    catalogs = {int(size): path for size, path in made["catalogs"].items()}
    args.tasks = ",".join(tasks)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    sizes: dict[int, dict] = {size: {} for size in catalogs}
    for step in STEPS:  # each step at both sizes in turn: a neighbour's load hits both alike
        for size, catalog in catalogs.items():
            sizes[size][step] = result = run_child(step, catalog, work, args)
            print(f"{size}x {step:9s} {result['rows']:7d} rows {result['rows_per_s']:9.1f} rows/s "
                  f"({result['cpu_s']:6.1f} CPU s)  peak RSS {result['peak_rss_mb']:7.1f} MB, workers "
                  f"{result['worker_peak_rss_mb']:7.1f} MB", flush=True)
    from common import report  # torch: imported once the steps are done

    small, large = sizes[1], sizes[args.factor]
    growth = compare(small, large)
    figures = {"catalog": source, "rows_1x": small["plan"]["rows"], "factor": args.factor,
               "rows_per_shard": args.rows_per_shard, "config": "tiny", "tasks": tasks, "cpus": os.cpu_count(),
               "precision": small["score"]["precision"], "steps": {f"{s}x": r for s, r in sizes.items()},
               "growth": growth, "targets": TARGETS, **verdicts(growth, {f"{s}x": r for s, r in sizes.items()}),
               "seconds": round(time.perf_counter() - started, 1),
               "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    report("scale", figures)


if __name__ == "__main__":
    main()
