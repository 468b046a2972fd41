"""Peak memory of scoring a batch of 6000x6000 images against a batch of thumbnails (issue 17, item 6).

    python bench/decode_memory.py [--config tiny] [--rows 32]

Three catalogs of --rows rows each, made here in a temporary folder: 60x80 JPEG thumbnails (fashion-small's
size), 6000x6000 JPEGs and 6000x6000 PNGs (36 MP, under the 40 MP limit). The pictures are procedural: a
product on a white background, smooth shading with a mild 4-px grain, so a 6000x6000 file stays well under
the 16 MiB byte limit (the sizes are printed). Each catalog is scored by `pipeline.scoring.distributor.score` (one
shard, one batch of --rows, workers=0: decoding runs in the scoring process) in a fresh interpreter, on a
checkpoint of --config with random weights; the figure is that process's peak RSS (VmHWM; see
`peak_rss_mb` for why not ru_maxrss) from the moment the model is loaded (the peak is reset there: loading
may peak higher), beside its RSS at that moment. The same batch is also only read (plan, Parquet, cells
as Python bytes) in another fresh process: scoring's peak over that one is what decoding and the forward
add.

Acceptance (issue 17): the peak of each 6000x6000 batch within 20% of the thumbnail batch's. What a batch
still holds in proportion to its input is the encoded bytes (read from Parquet, then as Python bytes), and
a PNG is decoded at full size (144 MB at 36 MP) one image at a time before its model view is cut out.
Ends with ONE JSON line with every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from cmaclip.config import INFERENCE_PRECISIONS  # noqa: E402  torch-free

LABELS = {"color": ["Blue", "Purple", "Red"]}
CASES = {"thumbnail JPEG 60x80": ("JPEG", (60, 80)), "6000x6000 JPEG": ("JPEG", (6000, 6000)),
         "6000x6000 PNG": ("PNG", (6000, 6000))}


# --- set-up (parent) ---------------------------------------------------------------------------------------

def picture(seed: int, size: tuple[int, int], grain: int = 4):
    """A product on white: a shaded shape with a fabric-like grain of `grain` px, the rest plain white."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    side = max(size)
    n = max(side // grain, 1)
    t = np.linspace(0, 1, n, dtype=np.float32)
    planes = [110 + 90 * np.outer(np.cos(rng.uniform(1, 3) * t + p), np.sin(rng.uniform(1, 3) * t + p))
              for p in rng.uniform(0, 3, 3)]
    small = np.clip(np.stack(planes, -1) + rng.normal(0, 3, (n, n, 3)), 0, 255).astype(np.uint8)
    shade = Image.fromarray(small).resize((side, side), Image.Resampling.NEAREST)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([side * 0.25, side * 0.15, side * 0.75, side * 0.85], fill=255)
    draw.rectangle([side * 0.2, side * 0.3, side * 0.8, side * 0.45], fill=255)
    out = Image.new("RGB", (side, side), "white")
    out.paste(shade, mask=mask)
    return out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)


def make_catalog(path: Path, fmt: str, size: tuple[int, int], rows: int, plain: bool) -> list[int]:
    """A catalog of `rows` distinct pictures in one row group; returns the encoded sizes in bytes. `plain`:
    the image column without dictionary encoding or compression, else as pyarrow writes it by default."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = []
    for i in range(rows):
        buf = io.BytesIO()
        picture(i, size).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        images.append(buf.getvalue())
    colors = LABELS["color"]
    table = pa.table({"product_id": [f"p{i:03d}" for i in range(rows)],
                      "title": [f"Acme {colors[i % 3]} Dress no. {i}" for i in range(rows)],
                      "image": pa.array(images, pa.binary())})
    if plain:
        pq.write_table(table, path, row_group_size=rows, use_dictionary=["product_id", "title"],
                       compression={"product_id": "snappy", "title": "snappy", "image": "none"})
    else:
        pq.write_table(table, path, row_group_size=rows)
    return [len(b) for b in images]


def make_checkpoint(config_name: str, path: Path) -> None:
    import torch

    import cmaclip
    from cmaclip.checkpoint import Checkpoint, save_checkpoint
    from cmaclip.config import load_config

    config = load_config(config_name).with_tasks({t: len(v) for t, v in LABELS.items()})
    torch.manual_seed(0)
    save_checkpoint(path, cmaclip.create_model(config, load_pretrained=False), Checkpoint(config, LABELS))


def child(mode: str, args: argparse.Namespace, catalog: Path, out: Path) -> dict:
    """Measure one catalog in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, __file__, "--child", mode, "--catalog", str(catalog), "--checkpoint", args.checkpoint,
           "--out", str(out), "--rows", str(args.rows), "--precision", args.precision]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scoring {catalog.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- measurement (child) -------------------------------------------------------------------------------------

def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024, 1)


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries the parent's peak into an exec'd child's
    (exec records the old address space's high-water mark), so a child of a 1.5 GB parent reports 1.5 GB."""
    return status_mb("VmHWM")


def measure(mode: str, args: argparse.Namespace) -> dict:
    """`score`: the whole scoring path. `read`: only what it reads before decoding (plan, Parquet, the
    cells as Python objects), with the model loaded alike, so the difference is what decoding adds."""
    import pyarrow as pa

    from pipeline.scoring import distributor, planner, reader, runner

    predictor = runner.load_predictor(args.checkpoint, precision=args.precision)
    predictor.preprocessor.build()  # the tokenizer's vocabulary is not part of what a batch holds
    load_peak = peak_rss_mb()
    # Reset the peak (Linux >= 4.0), which loading the weights may have set (fp32 read, then cast): from
    # here on, it is the peak of scoring the batch.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "score":
        summary = distributor.score(args.catalog, predictor, args.out, rows_per_shard=args.rows,
                                    batch_size=args.rows, workers=0, progress=False)
        rows = summary["predicted"]
    else:
        shard = planner.plan_shards(args.catalog, args.rows).shards[0]
        table = pa.Table.from_batches(next(reader.raw_batches(shard, args.rows)))
        rows = len([table.column(i).to_pylist() for i in range(3)][2])
    return {"seconds": time.perf_counter() - start, "rows": rows, "precision": predictor.precision,
            "load_peak_rss_mb": load_peak, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


# --- main ----------------------------------------------------------------------------------------------------

def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="model config (random weights); default tiny")
    p.add_argument("--rows", type=int, default=32, help="rows per catalog = the batch size (default 32)")
    p.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS)
    p.add_argument("--plain-images", action="store_true",
                   help="write the image column without dictionary encoding or compression (default: as "
                        "pyarrow writes it by default, dictionary-encoded and snappy)")
    p.add_argument("--work-dir", help="where the catalogs go (default: a new temporary folder)")
    p.add_argument("--child", choices=["score", "read"], help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    from common import machine, report

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-decode-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    args.checkpoint = str(work / "ckpt")
    make_checkpoint(args.config, Path(args.checkpoint))
    info = machine()
    print(f"decode memory bench: config {args.config}, {args.rows} rows per batch, workers 0, image column "
          f"{'plain' if args.plain_images else 'as pyarrow writes it'}, CPU {info['cpu']}, "
          f"{info['threads']} threads", flush=True)
    results = {}
    for name, (fmt, size) in CASES.items():
        slug = name.replace(" ", "-")
        sizes = make_catalog(work / f"{slug}.parquet", fmt, size, args.rows, args.plain_images)
        scored = child("score", args, work / f"{slug}.parquet", work / f"out-{slug}")
        read = child("read", args, work / f"{slug}.parquet", work / f"out-{slug}")
        assert scored["rows"] == read["rows"] == args.rows, (scored, read)
        results[name] = result = {
            "peak_rss_mb": scored["peak_rss_mb"], "model_loaded_rss_mb": scored["rss_before_mb"],
            "model_load_peak_rss_mb": scored["load_peak_rss_mb"],
            "read_only_peak_rss_mb": read["peak_rss_mb"], "seconds": round(scored["seconds"], 2),
            "precision": scored["precision"], "file_mib_max": round(max(sizes) / 2**20, 2),
            "batch_file_mib": round(sum(sizes) / 2**20, 1)}
        print(f"{name:21s}: peak RSS {result['peak_rss_mb']:7.1f} MB; model loaded "
              f"{result['model_loaded_rss_mb']:.1f}, reading alone {result['read_only_peak_rss_mb']:.1f}; files up to "
              f"{result['file_mib_max']:.2f} MiB, {result['batch_file_mib']:.1f} MiB in the batch; "
              f"{result['seconds']:.1f} s, {result['precision']}", flush=True)
    base = results["thumbnail JPEG 60x80"]["peak_rss_mb"]
    over = {name: round(r["peak_rss_mb"] / base - 1, 3) for name, r in results.items()}
    for name in list(CASES)[1:]:
        verdict = "within" if over[name] <= 0.20 else "NOT within"
        print(f"{name}: {over[name]:+.1%} over the thumbnail batch ({verdict} 20%)", flush=True)
    # Decoding's share: the scoring peak over the peak of reading the same batch alone.
    decode = {name: round(r["peak_rss_mb"] - r["read_only_peak_rss_mb"], 1) for name, r in results.items()}
    print("scoring peak over reading alone (MB): " + ", ".join(f"{k} {v:+.1f}" for k, v in decode.items()), flush=True)
    report("decode_memory", {"config": args.config, "rows": args.rows, "workers": 0,
                             "image_column": "plain" if args.plain_images else "pyarrow default",
                             "precision": results["6000x6000 JPEG"]["precision"], "cases": results,
                             "peak_over_thumbnails": over, "scoring_over_reading_mb": decode,
                             "accepted": all(v <= 0.20 for v in over.values())})


if __name__ == "__main__":
    main()
