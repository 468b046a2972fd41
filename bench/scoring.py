"""Scoring throughput against its physical limit, the forward pass, and peak memory against catalog size.

    python bench/scoring.py --config paper-vit-b-32 --rows 2000 [--device cuda] [--avx2-only]

Each measurement runs in a fresh process:

  compare   over a catalog of --rows rows, shard by shard in alternation (so a neighbour's load on a
            shared machine hits all three alike): the real pipeline (plan, read Parquet, decode,
            preprocess, tokenize, forward, write, done marker); the forward pass alone on the same rows
            prepared beforehand (the limit); and the naive path (fp32 weights, the full 77-token context,
            read + decode then forward in turn) on --naive-rows of them, with the top-1 agreement of the
            pipeline's precision (bf16, int8) with it. Each with its FLOP utilisation: samples/s x FLOPs
            per sample (torch's FlopCounter on the fp32 model, the first batch's titles) over the matmul
            peak of its precision, measured in the same process.
  memory    the pipeline alone over --rows / 5 rows and over --rows rows: peak RSS at 1x and 5x
            (--no-memory leaves it out).

`--avx2-only` runs the measurements with every kernel library capped at AVX2 (bench/common.py: an
AVX2-only CPU on this one); `--device cuda` scores on the GPU (decode workers: --workers, default auto).

Random CLIP and sequence-attention weights (no pretrained download), modality attention and heads fitted
to the catalog's labels (see `fit_heads`); the real fashion-small images when present (60x80 JPEGs,
upsampled to the model's 224 px), else the synthetic catalog. Ends with ONE JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
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
TASK_COLUMNS = ("color", "article_type", "usage", "gender", "pattern", "style")


# --- set-up (parent) ---------------------------------------------------------------------------------------

def make_catalog(rows: int, path: Path) -> str:
    """The first `rows` products of fashion-small (row groups as shipped), else a synthetic catalog."""
    import pyarrow.parquet as pq

    if FASHION_SMALL.is_file():
        source = pq.ParquetFile(FASHION_SMALL)
        table = source.read_row_groups(list(range(source.num_row_groups)), columns=None).slice(0, rows)
        pq.write_table(table, path, row_group_size=2048, compression="zstd")
        return "fashion-small"
    from pipeline.synthetic import make_catalog as synthetic
    synthetic(rows, str(path), seed=0, image_size=224)
    return "synthetic"


def make_checkpoint(config_name: str, catalog: str, path: Path, device: str = "cpu") -> dict[str, int]:
    import pyarrow.parquet as pq
    import torch

    import cmaclip
    from cmaclip.checkpoint import Checkpoint, save_checkpoint
    from cmaclip.config import load_config

    names = [c for c in TASK_COLUMNS if c in pq.read_schema(catalog).names][:4]
    table = pq.read_table(catalog, columns=names)
    labels = {c: sorted({str(v) for v in table.column(c).to_pylist() if v is not None}) for c in names}
    config = load_config(config_name).with_tasks({t: len(v) for t, v in labels.items()})
    torch.manual_seed(0)
    model = cmaclip.create_model(config, load_pretrained=False)
    fit_heads(model.to(device), catalog, labels)
    save_checkpoint(path, model.cpu(), Checkpoint(config, labels))
    return {t: len(v) for t, v in labels.items()}


def fit_heads(model, catalog: str, labels: dict[str, list[str]], rows: int = 512, steps: int = 300) -> None:
    """Train the modality attention and heads (the tuning stage, on cached I' and T') over the catalog's
    first rows, so the model makes decisions with real margins. With every weight random the top two
    classes lie within rounding of each other, and the bf16 agreement would measure ties, not precision."""
    import pyarrow.parquet as pq
    import torch

    from cmaclip.losses import IGNORE, multitask_loss
    from cmaclip.precision import autocast, resolve_precision
    from pipeline.scoring.predictor import Preprocessor, decode_rows

    table = pq.read_table(catalog).slice(0, rows)
    good, _ = decode_rows(zip(*(table.column(c).to_pylist() for c in ("product_id", "title", "image"))))
    keep = {pid: i for i, pid in enumerate(table.column("product_id").to_pylist())}
    rows_kept = [keep[pid] for pid in good.product_ids]
    pre, model = Preprocessor(model.config), model.eval()
    device = next(model.parameters()).device
    image, text = [], []
    # The training precision (emulated bf16 on an AVX2-only CPU would take an hour here).
    with torch.no_grad(), autocast(device, resolve_precision("auto", device)):
        for lo in range(0, len(rows_kept), 32):
            batch = slice(lo, lo + 32)
            pixels, tokens = pre.images(good.images[batch]).to(device), pre.texts(good.titles[batch]).to(device)
            i, t = model.fuse(model.encode_tokens(pixels, tokens))
            image.append(i.float())
            text.append(t.float())
    image, text = torch.cat(image), torch.cat(text)
    index = {task: {name: k for k, name in enumerate(names)} for task, names in labels.items()}
    targets = {task: torch.tensor([index[task].get(str(table.column(task)[r].as_py()), IGNORE) for r in rows_kept],
                                  device=device) for task in labels}
    params = [*model.modality_attention.parameters(), *model.heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        multitask_loss(model.classify(image, text).logits, targets)[0].backward()
        optimizer.step()
    model.eval()


def child(mode: str, args: argparse.Namespace, **extra) -> dict:
    """Run one measurement in a fresh interpreter; it prints one JSON line."""
    from common import AVX2_ONLY

    cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", args.checkpoint, "--catalog", args.catalog_path,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", args.precision,
           "--rows-per-shard", str(args.rows_per_shard), "--out", args.out, "--device", args.device]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(AVX2_ONLY if args.avx2_only else {})}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- measurements (children) ---------------------------------------------------------------------------------

def peak_rss_mb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN covers the (joined) DataLoader workers.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(workers, 1)}


def forward_only(shard, predictor, batch_size: int, limit: int | None = None) -> tuple[int, float]:
    """The limit: forward passes over the shard's rows, each batch decoded and tokenized beforehand exactly
    as the pipeline does it, untimed. One batch at a time, so memory stays that of the pipeline."""
    from pipeline.scoring import reader

    rows, seconds = 0, 0.0
    for slices in reader.raw_batches(shard, batch_size):
        batch = reader.prepare_batch(0, slices, predictor.preprocessor, shard)
        start = time.perf_counter()
        predictor.predict(batch.pixels, batch.tokens)
        seconds += time.perf_counter() - start
        rows += batch.pixels.shape[0]
        if limit is not None and rows >= limit:
            break
    return rows, seconds


def naive_path(shard, naive, fast, batch_size: int, limit: int) -> dict[str, float]:
    """fp32 weights, the full 77-token context, open_clip's per-image preprocessing, each batch read and
    decoded then forwarded in turn, over the shard's first `limit` rows. Also the pipeline precision's top-1
    agreement with it (untimed)."""
    import pyarrow as pa
    import torch

    from cmaclip.transforms import image_transform, tokenizer
    from pipeline.scoring import reader
    from pipeline.scoring.predictor import decode_rows

    config, pre = naive.checkpoint.config, fast.preprocessor
    per_image, full_context = image_transform(config), tokenizer(config)  # [B, 77], not trimmed
    rows = seconds = agree = total = 0
    tick = time.perf_counter()
    for slices in reader.raw_batches(shard, batch_size):
        table = pa.Table.from_batches(slices)
        good, _ = decode_rows(zip(*(table.column(i).to_pylist() for i in range(3))), draft=pre.draft)
        pixels = torch.stack([per_image(im) for im in good.images])
        reference = naive.predict(pixels, full_context(good.titles))
        seconds += time.perf_counter() - tick
        rows += pixels.shape[0]
        low = fast.predict(pre.images(good.images), pre.texts(good.titles))
        agree += sum(int((reference[f"{t}_top"] == low[f"{t}_top"]).sum()) for t in naive.tasks)
        total += pixels.shape[0] * len(naive.tasks)
        if rows >= limit:
            break
        tick = time.perf_counter()
    return {"rows": rows, "seconds": seconds, "agree": agree, "total": total}


def flops_and_peaks(shard, naive, fast, batch_size: int) -> dict:
    """FLOPs per sample of the fp32 model on the shard's first batch, its titles trimmed as the pipeline
    does and in the full context as the naive path does; the matmul peak of each precision, now."""
    import torch
    import torch.nn.functional as F

    from common import flops_per_sample, matmul_peak_gflops
    from pipeline.scoring import reader

    batch = reader.prepare_batch(0, next(iter(reader.raw_batches(shard, batch_size))), fast.preprocessor, shard)
    pixels, trimmed = batch.pixels.float().to(naive.device), batch.tokens.to(naive.device)
    full = F.pad(trimmed, (0, naive.checkpoint.config.clip.context_length - trimmed.shape[1]))  # zeros, as tokenized
    with torch.inference_mode():
        flops = {"trimmed": flops_per_sample(lambda: naive._logits(pixels, trimmed), len(pixels)),
                 "full_context": flops_per_sample(lambda: naive._logits(pixels, full), len(pixels))}
    peaks = {p: matmul_peak_gflops(p, str(naive.device)) for p in {fast.precision, "fp32"}}
    return {"flops_per_sample": flops, "peak_gflops": peaks}


def _catalog(args: argparse.Namespace) -> Path:
    import pyarrow.parquet as pq

    catalog = Path(args.out) / f"catalog-{args.limit}.parquet"
    pq.write_table(pq.read_table(args.catalog).slice(0, args.limit), catalog, row_group_size=2048)
    return catalog


def _score(shard, predictor, out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    from pipeline.scoring import runner

    start = time.perf_counter()
    workers = None if args.workers == "auto" else int(args.workers)
    marker = runner.score_shard(shard, predictor, str(out), batch_size=args.batch_size, workers=workers)
    return marker, time.perf_counter() - start


def measure_compare(args: argparse.Namespace) -> dict:
    """Over a catalog of `limit` rows: the pipeline (plan, then each shard from Parquet read to done marker),
    the forward-only limit on the same rows, and the naive path on a slice of them. The three alternate
    shard by shard, so a neighbour's load on a shared machine hits them alike."""
    import math
    import shutil

    from pipeline.scoring import planner
    from pipeline.scoring.predictor import Predictor

    catalog, out = _catalog(args), Path(args.out) / f"compare-{args.limit}"
    shutil.rmtree(out, ignore_errors=True)
    fast = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, device=args.device)
    naive = Predictor.from_checkpoint(args.checkpoint, precision="fp32", device=args.device)
    start = time.perf_counter()
    plan = planner.plan_shards(str(catalog), args.rows_per_shard)
    e2e_s, markers = time.perf_counter() - start, []
    forward_only(plan.shards[0], fast, args.batch_size, limit=1)  # warm-up: oneDNN builds kernels on first use
    naive_path(plan.shards[0], naive, fast, args.batch_size, limit=1)
    fwd, slow = [0, 0.0], {"rows": 0, "seconds": 0.0, "agree": 0, "total": 0}
    per_shard = math.ceil(args.naive_rows / len(plan.shards))
    for shard in plan.shards:
        marker, seconds = _score(shard, fast, out, args)
        markers.append(marker)
        e2e_s += seconds
        rows, seconds = forward_only(shard, fast, args.batch_size)
        fwd = [fwd[0] + rows, fwd[1] + seconds]
        measured = naive_path(shard, naive, fast, args.batch_size, per_shard)
        slow = {k: v + measured[k] for k, v in slow.items()}
    rows = sum(m["rows_in"] for m in markers)
    return {"e2e_samples_per_s": rows / e2e_s, "forward_samples_per_s": fwd[0] / fwd[1], "rows": rows,
            "e2e_s": e2e_s, "forward_s": fwd[1], "shards": len(markers), "precision": fast.precision,
            "threads": torch_threads(), "workers": markers[0]["workers"],
            "e2e_wait_s": sum(m["timings"]["wait_s"] for m in markers),
            "e2e_forward_s": sum(m["timings"]["forward_s"] for m in markers),
            "naive_rows": slow["rows"], "naive_samples_per_s": slow["rows"] / slow["seconds"],
            "top1_agreement_with_fp32": slow["agree"] / slow["total"],
            **flops_and_peaks(plan.shards[0], naive, fast, args.batch_size)}


def measure_memory(args: argparse.Namespace) -> dict:
    """The pipeline alone over a catalog of `limit` rows, for its peak RSS."""
    import shutil

    from pipeline.scoring import planner
    from pipeline.scoring.predictor import Predictor

    catalog, out = _catalog(args), Path(args.out) / f"memory-{args.limit}"
    shutil.rmtree(out, ignore_errors=True)
    predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, device=args.device)
    plan = planner.plan_shards(str(catalog), args.rows_per_shard)
    seconds = sum(_score(shard, predictor, out, args)[1] for shard in plan.shards)
    return {"rows": plan.rows, "e2e_samples_per_s": plan.rows / seconds, **peak_rss_mb()}


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


# --- main ------------------------------------------------------------------------------------------------

def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper-vit-b-32")
    p.add_argument("--rows", type=int, default=2000, help="catalog rows for forward-only, e2e and the 5x memory run")
    p.add_argument("--memory-rows", type=int, help="the 1x memory run (default rows / 5)")
    p.add_argument("--naive-rows", type=int, default=192, help="rows for the (slow) naive path")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="auto", help="decode workers: a number, or auto (the pipeline's default)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--avx2-only", action="store_true", help="measure with every kernel library capped at AVX2")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="leave out the 1x / 5x peak RSS runs")
    p.add_argument("--work-dir", help="default: a temporary folder")
    # internal: one measurement in a child process
    p.add_argument("--child", choices=["compare", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def compare_figures(big: dict) -> dict:
    """The compare child's figures, with the utilisation of each path against its precision's peak."""
    from common import utilisation

    flops, peaks, precision = big["flops_per_sample"], big["peak_gflops"], big["precision"]
    return {
        "rows": big["rows"], "workers": big["workers"], "precision": precision, "threads": big["threads"],
        "forward_samples_per_s": round(big["forward_samples_per_s"], 2),
        "e2e_samples_per_s": round(big["e2e_samples_per_s"], 2),
        "e2e_over_forward": round(big["e2e_samples_per_s"] / big["forward_samples_per_s"], 3),
        "e2e_s": round(big["e2e_s"], 2), "e2e_forward_s": round(big["e2e_forward_s"], 2),
        "e2e_wait_s": round(big["e2e_wait_s"], 2),
        "naive_rows": big["naive_rows"], "naive_samples_per_s": round(big["naive_samples_per_s"], 2),
        "speedup_over_naive": round(big["e2e_samples_per_s"] / big["naive_samples_per_s"], 2),
        "top1_agreement_with_fp32": round(big["top1_agreement_with_fp32"], 4),
        "matmul_peak_gflops": {p: round(v, 1) for p, v in peaks.items()},
        "forward_utilisation": utilisation(big["forward_samples_per_s"], flops["trimmed"], peaks[precision]),
        "e2e_utilisation": utilisation(big["e2e_samples_per_s"], flops["trimmed"], peaks[precision]),
        "naive_utilisation": utilisation(big["naive_samples_per_s"], flops["full_context"], peaks["fp32"]),
        "machine": big["machine"],
    }


def memory_figures(args: argparse.Namespace) -> dict:
    """Peak RSS of the pipeline over rows / 5 and over rows."""
    small = child("memory", args, limit=args.memory_rows or max(args.rows // 5, 1))
    large = child("memory", args, limit=args.rows)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    print(f"peak RSS: {small['rows']} rows {small['peak_rss_mb']:.0f} MB, {large['rows']} rows "
          f"{large['peak_rss_mb']:.0f} MB ({growth:+.1%}); decode worker {small['worker_peak_rss_mb']:.0f} / "
          f"{large['worker_peak_rss_mb']:.0f} MB", flush=True)
    return {"memory_rows_1x": small["rows"], "memory_rows_5x": large["rows"],
            "peak_rss_mb_1x": small["peak_rss_mb"], "peak_rss_mb_5x": large["peak_rss_mb"],
            "peak_rss_growth": round(growth, 4), "worker_peak_rss_mb_1x": small["worker_peak_rss_mb"],
            "worker_peak_rss_mb_5x": large["worker_peak_rss_mb"]}


def main() -> None:
    args = parse()
    if args.child:
        from common import machine

        result = {"compare": measure_compare, "memory": measure_memory}[args.child](args)
        print(json.dumps({**result, "machine": machine(args.device)}))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    args.catalog_path, args.checkpoint, args.out = str(work / "catalog.parquet"), str(work / "ckpt"), str(work)
    source = make_catalog(args.rows, Path(args.catalog_path))
    tasks = make_checkpoint(args.config, args.catalog_path, Path(args.checkpoint), args.device)
    print(f"scoring bench: config {args.config}, {source} catalog, {args.rows} rows, tasks {tasks}, "
          f"batch {args.batch_size}, workers {args.workers}, cpus {os.cpu_count()}, device {args.device}", flush=True)

    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    big = compare_figures(child("compare", args, limit=args.rows, naive_rows=args.naive_rows))
    from common import describe
    print(f"{describe(big['machine'])}\n"
          f"forward only (the limit) : {big['forward_samples_per_s']:7.2f} samples/s ({big['precision']}, "
          f"utilisation {big['forward_utilisation']['utilisation']:.1%})\n"
          f"end to end pipeline      : {big['e2e_samples_per_s']:7.2f} samples/s "
          f"(ratio {big['e2e_over_forward']:.3f})\n"
          f"naive (fp32, 77 tokens, in turn): {big['naive_samples_per_s']:7.2f} samples/s "
          f"(speedup {big['speedup_over_naive']:.2f}x, over {big['naive_rows']} rows)\n"
          f"top-1 agreement of {big['precision']} with fp32: {big['top1_agreement_with_fp32']:.4f}", flush=True)
    figures = {"bench": "scoring", "config": args.config, "catalog": source, "tasks": tasks, "device": args.device,
               "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard, "cpus": os.cpu_count(), **big,
               **(memory_figures(args) if args.memory else {}),
               "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
