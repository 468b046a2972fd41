"""Ingest and loader throughput on the real data set (fashion-small, 20,193 products).

    python bench/ingest.py [--catalog PATH] [--config paper-vit-b-32] [--samples 2048] [--workers 0,1,2]

Reports ingest rows/s (validate + decode every image + dedup + split + write, end to end), then the
loader's decoded samples/s (Parquet read, JPEG decode, resize to the config's image size, normalise,
tokenize, collate) with 0, 1 and 2 DataLoader workers, and in-process with one torch thread. The
last line is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cmaclip.config import load_config  # noqa: E402
from cmaclip.transforms import image_size  # noqa: E402
from common import report  # noqa: E402
from pipeline.ingest.dataset import ingest  # noqa: E402
from pipeline.training.data import make_loader  # noqa: E402

DEFAULT_CATALOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                               "data", "fashion-small", "products.parquet")


def bench_ingest(catalog: str, tasks: str, out: str) -> dict:
    started = time.perf_counter()
    manifest = ingest(catalog, tasks, out)
    seconds = time.perf_counter() - started
    rows = manifest["counts"]["rows_in"]
    print(f"ingest: {rows} rows in {seconds:.1f}s = {rows / seconds:.0f} rows/s "
          f"({manifest['counts']['rows_kept']} kept, {manifest['run']['workers']} decode processes)")
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "kept": manifest["counts"]["rows_kept"], "decode_processes": manifest["run"]["workers"]}


def bench_loader(out: str, config, workers: int, samples: int, batch_size: int) -> dict:
    """Steady-state samples/s after the first batch (which pays for worker start-up), and that start-up."""
    loader = make_loader(out, "train", config, batch_size=batch_size, shuffle=True, num_workers=workers)
    started = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - started
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["product_id"])
        if n >= samples:
            break
    seconds = time.perf_counter() - t0
    rate = n / seconds
    print(f"loader workers={workers}: {rate:.0f} samples/s over {n} samples "
          f"(first batch after {first:.2f}s), images {tuple(batch['images'].shape)}")
    return {"samples_per_s": round(rate, 1), "samples": n, "first_batch_s": round(first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default=DEFAULT_CATALOG)
    parser.add_argument("--tasks", default="color,article_type,usage")
    parser.add_argument("--config", default="paper-vit-b-32")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    config = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as out:
        figures = {"ingest": bench_ingest(args.catalog, args.tasks, out),
                   "loader": {"config": args.config, "image_size": image_size(config), "batch_size": args.batch_size}}
        for w in (int(x) for x in args.workers.split(",")):
            figures["loader"][f"workers_{w}"] = bench_loader(out, config, w, args.samples, args.batch_size)
        # In-process preprocessing runs on torch's intra-op threads; tiny per-image ops on several
        # threads of a busy machine mostly wait. One thread shows what the in-process path can do.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        figures["loader"]["workers_0_torch_threads_1"] = bench_loader(out, config, 0, args.samples, args.batch_size)
        torch.set_num_threads(threads)
    # The figures only mean something next to how busy the machine was while they were taken.
    figures["cpus"] = os.cpu_count()
    figures["load_avg_1m"] = round(os.getloadavg()[0], 2)
    report("ingest", figures)


if __name__ == "__main__":
    main()
