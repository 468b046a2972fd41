"""Nightly scoring that scales with what changed (issue 14): a full night, an incremental night, and the cost
of publishing after many nights.

    python bench/nightly.py [--config tiny] [--rows N] [--nights 30]

A catalog of the first --rows products of fashion-small (all 20,193 by default; a synthetic catalog when
fashion-small is absent) and a checkpoint of --config (random weights, heads fitted to the catalog's labels
as bench/scoring.py does). Then, each step in a fresh interpreter (as an Airflow task runs it), timed from
before the step's work (model load included) to its end, with the process's peak RSS (VmHWM):

  night 0     full run: plan -> score every shard -> finalize -> publish.
  night 1     --change of the rows edited (half their titles, half their images: another product's bytes),
              --change / 2 products added and as many deleted (pipeline.catalog_edits); the incremental run:
              plan (hashes every row) -> score (reads every row, forwards the changed ones in full batches)
              -> finalize -> publish. `incremental_over_full`: its seconds over the full run's (target
              <= 0.05), the faster of night 0 and the rescore below (a busy machine slows one run down).
  rescore     night 1's catalog scored in full (`full=True`) into another folder and published; its published
              state against the incremental one, row for row by product_id (the prediction columns and the
              content hash; labels and strings exact, floats to 1e-5): `published_equal`; rows whose labels
              differ and the max float difference, apart for the rows night 1 scored and those it carried
              over; `only_incremental_deleted`: deleted products the incremental state still holds (0: publish
              drops them).
  precision   fp32 by default: the one precision where a row's outputs do not depend on the rows batched
              beside it (batch size, title length the batch is trimmed to), so a carried row equals its
              rescore (to ~2e-6). In bf16 they move with the batch's shapes: a carried row was scored beside
              other rows than in the rescore, and two full runs over the same catalog in other batches
              disagree as much (4,000 rows of fashion-small, batches of 32 against 31: 13 rows' labels
              differ, floats by up to 0.026; the incremental night against its rescore: 13 rows too).
              `--precision bf16` runs the same check and reports those differences: the equality is a
              property of fp32 scoring. int8 (an AVX2-only CPU's auto) quantizes each batch's activations
              with one scale: batch-dependent as well.
  utilisation the score step's FLOP utilisation (bench/common.py), of its forward passes and of the whole
              step, counted after the step (outside its seconds, RSS and wall_s).
  nights      --nights more nights of --night-change each. The first and the last --samples run step by step
              as above; those between run in one process (plan + score + finalize, then publish).
              `publish_time_ratio`: the fastest publish of the last --samples nights over that of the first
              (one ~1 s sample moves by 20% on a busy machine), `publish_cpu_ratio` the same in CPU seconds
              (steadier); `publish_rss_ratio`: their median peak RSS (targets <= 1.10).

Catalog snapshots are written under the work folder (each ~78 MB for all of fashion-small; the one before is
removed once the next is made, as nothing reads it again), never into the repository. Each step's
interpreter start (torch and the pipeline imported: 3-8 s) is outside the measured seconds, reported as
`wall_s`. Time: `--rows 4000 --nights 5` took 3-7 minutes on 2 busy CPU cores (tiny config, load 3-6); the
defaults, 5x the rows and 6x the nights, should take about 15 minutes on 2 idle cores (an estimate).
Ends with ONE JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
STEPS = ("plan", "score", "finalize", "publish")
IGNORED = ("run_id", "scored_at")  # lineage: which run made a row, not what it predicts
FLOAT_TOLERANCE = 1e-5             # fp32: the last bits move with the batch's shapes (seen: 1.7e-6)


# --- the catalog of each night (parent, and the child that runs the nights between) -------------------------

def catalog_path(work: Path, night: int) -> Path:
    return work / "catalogs" / f"night-{night:03d}.parquet"


def advance(work: Path, night: int, change: float, seed: int) -> dict[str, list]:
    """Night `night`'s snapshot from the night before's, which is then removed; the product_ids of each edit."""
    import pyarrow.parquet as pq

    from pipeline.catalog_edits import Edits, next_snapshot

    before = catalog_path(work, night - 1)
    table = pq.read_table(before)
    snapshot, changed = next_snapshot(table, night, Edits.share(table.num_rows, change), seed)
    pq.write_table(snapshot, catalog_path(work, night), row_group_size=2048, compression="zstd")
    before.unlink()
    return changed


# --- one step of a night (children) ---------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries the parent's peak into an exec'd child's."""
    with open("/proc/self/status") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)


def _workers(args: argparse.Namespace) -> int | None:
    return None if args.workers == "auto" else int(args.workers)


def step_plan(args: argparse.Namespace) -> dict:
    """What the DAG's plan task does: load the model, find the state to carry from, plan, name the run."""
    from pipeline.scoring import carry_over, planner, runner

    predictor = runner.load_predictor(args.checkpoint, precision=args.precision)
    lineage = predictor.lineage
    carry_from = None if args.full else carry_over.source(args.out, lineage.name, lineage.version, predictor.tasks)
    plan = planner.plan_shards(args.catalog, args.rows_per_shard, out=args.out, carry_from=carry_from)
    run = {"plan": plan.to_dict(), "run_id": runner.default_run_id(plan.id, predictor)}
    Path(args.run).write_text(json.dumps(run))
    return {**plan.counts(), "shards": len(plan.shards), "precision": predictor.precision}


def step_score(args: argparse.Namespace) -> dict:
    """Every shard of the plan, one after another, with one model load (the DAG's score tasks, in one)."""
    from pipeline.scoring import planner, runner

    run = json.loads(Path(args.run).read_text())
    plan = planner.Plan.from_dict(run["plan"])
    predictor = runner.load_predictor(args.checkpoint, precision=args.precision)
    markers = [runner.score_shard(shard, predictor, args.out, run_id=run["run_id"], batch_size=args.batch_size,
                                  workers=_workers(args)) for shard in plan.shards]
    total = {key: sum(m[key] for m in markers) for key in ("rows_in", "scored", "carried", "quarantined")}
    timings = {key: round(sum(m["timings"][key] for m in markers), 3) for key in ("forward_s", "wait_s")}
    return {**total, **timings, "workers": markers[0]["workers"]}


def step_finalize(args: argparse.Namespace) -> dict:
    from pipeline.scoring import finalize

    run = json.loads(Path(args.run).read_text())
    manifest = finalize.finalize(run["plan"], args.out, run["run_id"])
    return {key: manifest[key] for key in ("rows_in", "predicted", "scored", "carried", "quarantined")}


def step_publish(args: argparse.Namespace) -> dict:
    from pipeline.scoring import publish

    published = publish.publish(args.out, catalog=args.catalog)
    return {"products": published.get("products"), "verdict": published.get("verdict")}


def nights_between(args: argparse.Namespace) -> dict:
    """Nights --first .. --last in this process: the snapshot, then plan + score + finalize, then publish."""
    from pipeline.scoring import distributor, publish

    seconds = []
    for night in range(args.first, args.last + 1):
        advance(Path(args.work), night, args.night_change, args.seed)
        catalog = str(catalog_path(Path(args.work), night))
        start = time.perf_counter()
        scored = distributor.score(catalog, args.checkpoint, args.out, rows_per_shard=args.rows_per_shard,
                                   batch_size=args.batch_size, workers=_workers(args), precision=args.precision,
                                   progress=False)
        middle = time.perf_counter()
        publish.publish(args.out, catalog=catalog)
        seconds.append({"night": night, "score_s": round(middle - start, 2), "scored": scored["scored"],
                        "publish_s": round(time.perf_counter() - middle, 2)})
    return {"nights": seconds}


CHILDREN = {"plan": step_plan, "score": step_score, "finalize": step_finalize, "publish": step_publish,
            "nights": nights_between}
IMPORTS = {"plan": ("carry_over", "planner", "runner"), "score": ("planner", "runner"), "finalize": ("finalize",),
           "publish": ("publish",), "nights": ("distributor", "publish")}


def score_flops(args: argparse.Namespace) -> dict:
    """The model's FLOPs per sample and the matmul peaks now (bench/scoring.py's), for the score step's
    utilisation: counted after the step, outside its seconds and peak RSS."""
    from scoring import flops_and_peaks

    from pipeline.scoring import planner, runner

    shard = planner.Plan.from_dict(json.loads(Path(args.run).read_text())["plan"]).shards[0]
    fast = runner.load_predictor(args.checkpoint, precision=args.precision)
    fp32 = fast if fast.precision == "fp32" else runner.load_predictor(args.checkpoint, precision="fp32")
    return flops_and_peaks(shard, fp32, fast, args.batch_size)


def run_child(args: argparse.Namespace) -> dict:
    """Time the step once its modules are imported: the interpreter's start is not the step's cost. `cpu_s`:
    the CPU seconds of all its threads (DuckDB's too), which other jobs on the machine move less than seconds.
    `imports_rss_mb`: the peak RSS by then (torch's for plan and score; publish and finalize load none)."""
    import importlib

    for name in IMPORTS[args.child]:
        importlib.import_module(f"pipeline.scoring.{name}")
    before = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    result = CHILDREN[args.child](args)
    out = {"s": round(time.perf_counter() - start, 3), "cpu_s": round(time.process_time() - cpu, 3),
           "peak_rss_mb": peak_rss_mb(), "imports_rss_mb": before, **result}
    if args.child == "score":
        start = time.perf_counter()
        out.update(score_flops(args))
        out["flops_s"] = round(time.perf_counter() - start, 3)  # child() takes it out of wall_s
    return out


def score_utilisation(score: dict, precision: str) -> dict:
    """The score step's FLOP utilisation: of its forward passes alone, and of the whole step."""
    from common import utilisation

    flops, peak = score["flops_per_sample"]["trimmed"], score["peak_gflops"][precision]
    if not score["scored"]:
        return {}
    return {"forward_utilisation": utilisation(score["scored"] / max(score["forward_s"], 1e-9), flops, peak),
            "step_utilisation": utilisation(score["scored"] / score["s"], flops, peak)}


def child(step: str, args: argparse.Namespace, **extra) -> dict:
    """Run one step in a fresh interpreter; it prints one JSON line. `wall_s` includes the interpreter's start."""
    cmd = [sys.executable, __file__, "--child", step, "--checkpoint", args.checkpoint, "--config", args.config,
           "--precision", args.precision, "--batch-size", str(args.batch_size), "--workers", args.workers,
           "--rows-per-shard", str(args.rows_per_shard), "--seed", str(args.seed),
           "--night-change", str(args.night_change)]
    for key, value in extra.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": round(time.perf_counter() - start - result.get("flops_s", 0.0), 2)}


# --- the nights (parent) ----------------------------------------------------------------------------------------

def night(args: argparse.Namespace, number: int, out: Path, full: bool = False) -> dict:
    """One night, step by step, each in its own interpreter; the seconds and peak RSS of each."""
    catalog, run = catalog_path(Path(args.work), number), out.parent / f"run-{out.name}-{number:03d}.json"
    steps = {step: child(step, args, catalog=catalog, out=out, run=run, full=full) for step in STEPS}
    result = {"steps": steps, "s": round(sum(s["s"] for s in steps.values()), 3),
              "wall_s": round(sum(s["wall_s"] for s in steps.values()), 2),
              "run_id": json.loads(run.read_text())["run_id"]}
    score = steps["score"]
    score.update(score_utilisation(score, steps["plan"]["precision"]))
    used = score.get("forward_utilisation", {}).get("utilisation")
    print(f"night {number}{' (full rescore)' if full else ''}: {result['s']:.1f} s ("
          + ", ".join(f"{k} {v['s']:.1f} s / {v['peak_rss_mb']:.0f} MB" for k, v in steps.items())
          + f"); scored {score['scored']} (forward {score['forward_s']:.1f} s"
          + (f", {used:.1%} of the matmul peak" if used is not None else "") + ", waiting for batches "
          f"{score['wait_s']:.1f} s), carried {score['carried']}, quarantined {score['quarantined']}; "
          f"with interpreter starts {result['wall_s']:.0f} s", flush=True)
    return result


def compare_states(incremental: Path, full: Path, tasks: list[str], run_id: str, deleted: list[str]) -> dict:
    """Two published states row for row by product_id: the prediction columns and the content hash, labels
    exactly, float columns to FLOAT_TOLERANCE. Differences are counted apart for the rows run `run_id` scored and those
    it carried over (from a run whose batches held other neighbours); `only_incremental_deleted`: how many
    products only the incremental state holds were deleted from the catalog (they should have left it)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.contracts import prediction_columns

    columns = [c for c in prediction_columns(tasks) if c.name not in IGNORED]
    names = [c.name for c in columns]
    a, b = (pq.read_table(p, columns=names + ["run_id"]).sort_by("product_id") for p in (incremental, full))
    only_a = pc.invert(pc.is_in(a.column("product_id"), b.column("product_id")))
    only_b = pc.invert(pc.is_in(b.column("product_id"), a.column("product_id")))
    extra = a.column("product_id").filter(only_a).to_pylist()
    a, b = a.filter(pc.invert(only_a)), b.filter(pc.invert(only_b))
    labels = np.zeros(a.num_rows, dtype=bool)
    floats = np.zeros(a.num_rows)
    for column in columns:
        x, y = a.column(column.name), b.column(column.name)
        if column.type == "float32":
            diff = np.abs(x.to_numpy(zero_copy_only=False) - y.to_numpy(zero_copy_only=False))
            floats = np.fmax(floats, diff)
        else:
            labels |= np.array([u != v for u, v in zip(x.to_pylist(), y.to_pylist())], dtype=bool)
    scored = (a.column("run_id").to_numpy(zero_copy_only=False) == run_id)
    parts = {"scored": scored, "carried": ~scored}
    result = {"rows": [a.num_rows + len(extra), b.num_rows + int(pc.sum(only_b).as_py() or 0)],
              "only_incremental": len(extra), "only_incremental_deleted": len(set(extra) & set(deleted)),
              "only_full": int(pc.sum(only_b).as_py() or 0),
              "rows_labels_differ": {k: int(labels[m].sum()) for k, m in parts.items()},
              "max_float_diff": {k: float(floats[m].max(initial=0.0)) for k, m in parts.items()}}
    result["equal"] = (not extra and not result["only_full"] and not labels.any()
                       and float(floats.max(initial=0.0)) <= FLOAT_TOLERANCE)
    return result


def windows(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The first and the last --samples of the --nights nights after night 1 (apart, unless too few nights)."""
    first, last = 2, 1 + args.nights
    k = max(1, min(args.samples, args.nights // 2))
    return list(range(first, first + k)), list(range(max(last - k + 1, first), last + 1))


def step_by_step(args: argparse.Namespace, out: Path, nights: list[int], measured: dict[int, dict]) -> None:
    for number in nights:
        if number not in measured:
            advance(Path(args.work), number, args.night_change, args.seed)
            measured[number] = night(args, number, out)


def simulated_nights(args: argparse.Namespace, out: Path) -> dict:
    """--nights nights after night 1: the first and the last --samples step by step, those between in one
    process. A publish takes about a second, and on a shared machine one sample moves by 20% or more (the
    nights between: 0.65-1.14 s at load 6-16), so each end is --samples nights: the time ratio is of their
    fastest (interference only adds time; CPU seconds likewise), the peak RSS ratio of their medians."""
    early, late = windows(args)
    measured: dict[int, dict] = {}
    step_by_step(args, out, early, measured)
    between = list(range(early[-1] + 1, late[0]))
    if between:
        done = child("nights", args, work=args.work, out=out, first=between[0], last=between[-1])["nights"]
        print(f"nights {between[0]}-{between[-1]}: publish " + " ".join(f"{n['publish_s']:.1f}" for n in done)
              + " s", flush=True)
    step_by_step(args, out, late, measured)
    ends = [[measured[n]["steps"]["publish"] for n in window] for window in (early, late)]
    seconds = [min(p["s"] for p in end) for end in ends]
    cpu = [min(p["cpu_s"] for p in end) for end in ends]
    rss = [statistics.median(p["peak_rss_mb"] for p in end) for end in ends]
    own = [statistics.median(p["peak_rss_mb"] - p["imports_rss_mb"] for p in end) for end in ends]
    return {"early": early, "late": late, "publish_s": [[p["s"] for p in end] for end in ends],
            "publish_peak_rss_mb": [[p["peak_rss_mb"] for p in end] for end in ends],
            "publish_cpu_s": [[p["cpu_s"] for p in end] for end in ends],
            "publish_time_ratio": round(seconds[1] / seconds[0], 3), "publish_cpu_ratio": round(cpu[1] / cpu[0], 3),
            "publish_rss_ratio": round(rss[1] / rss[0], 3),
            "publish_rss_above_imports_mb": [round(m, 1) for m in own],
            "publish_rss_above_imports_ratio": round(own[1] / max(own[0], 1.0), 3),
            "night_s": [[measured[n]["s"] for n in window] for window in (early, late)],
            "between_publish_s": [n["publish_s"] for n in done] if between else []}


# --- main ------------------------------------------------------------------------------------------------------

def print_publish(later: dict) -> None:
    seconds, rss, own = later["publish_s"], later["publish_peak_rss_mb"], later["publish_rss_above_imports_mb"]
    print(f"publish, nights {later['early']} -> {later['late']}: {seconds[0]} -> {seconds[1]} s (fastest x"
          f"{later['publish_time_ratio']}; CPU {later['publish_cpu_s'][0]} -> {later['publish_cpu_s'][1]} s, fastest x"
          f"{later['publish_cpu_ratio']}), peak RSS {rss[0]} -> {rss[1]} MB (median x{later['publish_rss_ratio']}; "
          f"above the imports {own[0]:.0f} -> {own[1]:.0f} MB); target <= 1.10", flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--rows", type=int, default=20_193, help="catalog rows (default: all of fashion-small)")
    p.add_argument("--change", type=float, default=0.01,
                   help="night 1: share of rows edited (half as many added, as many deleted)")
    p.add_argument("--nights", type=int, default=30, help="simulated nights after night 1 (0: none)")
    p.add_argument("--night-change", type=float, default=0.001, help="each simulated night's share of rows edited")
    p.add_argument("--samples", type=int, default=3, help="publish measured on the first and the last this many nights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="auto", help="decode workers: a number, or auto (the pipeline's default)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default: scoring is batch-invariant, see above), bf16, int8 (its activations are "
                        "quantized per batch: batch-dependent too), or auto")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="kept when given; default: a temporary folder, removed at the end")
    # internal: one step in a child process
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("checkpoint", "catalog", "out", "run", "work"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, help=argparse.SUPPRESS)
    p.add_argument("--last", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def set_up(args: argparse.Namespace, work: Path) -> tuple[str, dict[str, int]]:
    """Night 0's catalog and the checkpoint; where the catalog came from and the tasks."""
    from scoring import make_catalog, make_checkpoint  # bench/scoring.py: the same catalog and model

    catalog_path(work, 0).parent.mkdir(parents=True, exist_ok=True)
    args.work, args.checkpoint = str(work), str(work / "ckpt")
    source = make_catalog(args.rows, catalog_path(work, 0))
    return source, make_checkpoint(args.config, str(catalog_path(work, 0)), Path(args.checkpoint))


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    from common import cpu_model, report

    from pipeline.scoring.layout import published_uri

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-nightly-"))
    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    source, tasks = set_up(args, work)
    print(f"nightly bench: {cpu_model()}, {os.cpu_count()} cpus; config {args.config}, {source} catalog, "
          f"{args.rows} rows, tasks {tasks}, shards of {args.rows_per_shard}, batch {args.batch_size}", flush=True)
    out, rescore_out = work / "out", work / "out-full"
    full = night(args, 0, out)
    edited = advance(work, 1, args.change, args.seed)
    edits = {kind: len(ids) for kind, ids in edited.items()}
    incremental = night(args, 1, out)
    rescore = night(args, 1, rescore_out, full=True)
    states = [Path(published_uri(str(folder), "latest")) for folder in (out, rescore_out)]
    compared = compare_states(*states, list(tasks), incremental["run_id"], edited["deleted"])
    # Over the faster of the two full runs (night 0, the rescore): on a busy machine one may be slowed down,
    # and the faster one gives the higher, more cautious ratio.
    ratio = incremental["s"] / min(full["s"], rescore["s"])
    wall_ratio = incremental["wall_s"] / min(full["wall_s"], rescore["wall_s"])
    print(f"incremental / full: {ratio:.3f} (target <= 0.05; {wall_ratio:.3f} with interpreter starts), "
          f"{full['steps']['plan']['precision']}; edits {edits}\n"
          f"published states equal (labels exact, floats to {FLOAT_TOLERANCE}): {compared['equal']} {compared}",
          flush=True)
    later = simulated_nights(args, out) if args.nights else {}
    if later:
        print_publish(later)
    figures = {
        "config": args.config, "catalog": source, "rows": full["steps"]["plan"]["rows"], "tasks": tasks,
        "precision": full["steps"]["plan"]["precision"], "workers": full["steps"]["score"]["workers"],
        "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard, "cpus": os.cpu_count(),
        "change": args.change, "edits": edits, "night_change": args.night_change, "nights": args.nights,
        "full": full, "incremental": incremental, "rescore": rescore,
        "incremental_over_full": round(ratio, 4),
        "incremental_over_full_wall": round(wall_ratio, 4),
        "published_equal": compared["equal"], "compare": compared, "later_nights": later,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    report("nightly", figures)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
