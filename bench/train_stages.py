"""Training throughput of each stage, with and without the frozen-feature caches, random weights.

    python bench/train_stages.py [--configs tiny,paper-vit-b-32] [--precision auto] [--device cuda]

Each run trains two epochs over the same few micro-batches through the training loop of cmaclip.train
(frozen features, cache, autocast, accumulation, clipping, optimizer step) and reports samples/s of the
second epoch: for a cached run that is after the first epoch filled the cache. Validation and checkpoint
writing are left out: they are not training throughput, and for paper-vit-b-32 they write GBs per epoch.

Targets (issue 3), on paper-vit-b-32: warm-up epochs after the first >= 5x faster with the cache, tuning
>= 20x. The cache can only remove the frozen part of a step, so the speed-up is bounded by
(frozen forward + trainable step) / trainable step; the bench counts both in FLOPs and reports that
ceiling next to the measured ratio. Each run also reports its FLOP utilisation: samples/s x the FLOPs a
sample costs in it (frozen forward, unless cached, + trainable forward and backward) over the matmul peak of
the training precision, measured in the same run. On a GPU, each run's peak memory; `--micro-batch 1024
--stages end_to_end` is a step on the paper's whole batch at once. `--avx2-only` reruns the bench with every
kernel library capped at AVX2 (bench/common.py). The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import cmaclip  # noqa: E402
from cmaclip.cache import CacheConfig  # noqa: E402
from cmaclip.precision import resolve_precision  # noqa: E402
from cmaclip.losses import multitask_loss  # noqa: E402
from cmaclip.stages import apply_stage, frozen_forward, frozen_groups, frozen_prefix, trainable_forward  # noqa: E402
from cmaclip.train import _seed, _StageRun  # noqa: E402  the loop minus validation and checkpoints
from cmaclip.transforms import image_size, tokenizer, trim_tokens  # noqa: E402
from common import (describe, machine, matmul_peak_gflops, report, rerun_avx2_only, titles,  # noqa: E402
                    utilisation)

TASKS = {"color": 17, "pattern": 12}
TARGETS = {"warmup": 5.0, "tuning": 20.0}            # cached / uncached, paper-vit-b-32
RUNS = [("warmup", False), ("warmup", True), ("end_to_end", False), ("tuning", False), ("tuning", True)]


def make_batches(config, n_batches: int, micro: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    size, tok = image_size(config), tokenizer(config)
    out = []
    for b in range(n_batches):
        ids = [f"p{b * micro + i}" for i in range(micro)]
        out.append({"product_id": ids, "images": torch.randn(micro, 3, size, size, generator=g),
                    "text": trim_tokens(tok(titles(b * micro + micro)[b * micro:])),
                    "labels": {t: torch.randint(0, c, (micro,), generator=g) for t, c in TASKS.items()}})
    return out


def train_two_epochs(model, stage: str, config, batches, cache: bool, out_dir: str,
                     device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = _StageRun(model, stage, config, Path(out_dir),
                    cache=CacheConfig(dtype="half") if cache else None, device=device, labels=None)
    _seed(config.train.seed)
    epochs = []
    try:
        for _ in range(2):
            epochs.append(run.train_epoch(batches, callbacks=(), progress=False))
            run.state.epoch += 1
    finally:
        run.close()
    out = {"first_epoch": round(epochs[0]["train/samples_per_s"], 3),
           "samples_per_s": round(epochs[1]["train/samples_per_s"], 3)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def stage_flops(model, stage: str, config, batch: dict) -> dict[str, float]:
    """FLOPs of the frozen forward and of the trainable step (forward + backward) for one micro-batch;
    the cache removes the first, so (frozen + trainable) / trainable bounds its speed-up. Counted in fp32
    (the count does not depend on the dtype; the counter does not compose with autocast's fused paths)."""
    model = model.cpu()
    apply_stage(model, stage, config)
    prefix = frozen_prefix(model, frozen_groups(stage, config))
    batch = {"product_id": batch["product_id"][:4], "images": batch["images"][:4],   # FLOPs scale with n
             "text": batch["text"][:4], "labels": {t: y[:4] for t, y in batch["labels"].items()}}
    with FlopCounterMode(display=False) as frozen, torch.no_grad():
        inputs = frozen_forward(model, prefix, batch["images"], batch["text"])
    with FlopCounterMode(display=False) as trainable:
        loss, _ = multitask_loss(trainable_forward(model, prefix, **inputs).logits, batch["labels"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    f, t = frozen.get_total_flops(), trainable.get_total_flops()
    n = len(batch["product_id"])
    return {"frozen_gflop_per_sample": f / n / 1e9, "trainable_gflop_per_sample": t / n / 1e9,
            "speedup_ceiling": round((f + t) / t, 1)}


def run_figures(figures: dict, flops: dict, cache: bool, peak: float) -> dict:
    """A run's utilisation: a cached epoch skips the frozen forward, an uncached one does it every step."""
    gflop = flops["trainable_gflop_per_sample"] + (0.0 if cache else flops["frozen_gflop_per_sample"])
    return {**figures, **utilisation(figures["samples_per_s"], gflop * 1e9, peak)}


def bench_config(name: str, n_batches: int, micro: int, precision: str, device: torch.device,
                 runs: list[tuple[str, bool]]) -> dict:
    config = cmaclip.load_config(name).with_tasks(TASKS)
    config.train.precision, config.train.micro_batch_size = precision, micro
    config.train.batch_size = micro                  # one optimizer step per micro-batch: the slowest case
    torch.manual_seed(0)
    model = cmaclip.create_model(config, load_pretrained=False)   # reused by every run: weights don't matter
    batches = make_batches(config, n_batches, micro)
    out: dict = {"micro_batch": micro, "batches_per_epoch": n_batches,
                 "trimmed_tokens": max(int(b["text"].shape[1]) for b in batches),
                 "precision": resolve_precision(precision, device)}
    out["matmul_peak_gflops"] = peak = round(matmul_peak_gflops(out["precision"], str(device)), 1)
    flops = {stage: stage_flops(model, stage, config, batches[0]) for stage in {stage for stage, _ in runs}}
    for stage, cache in runs:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            figures = run_figures(train_two_epochs(model, stage, config, batches, cache, tmp, device),
                                  flops[stage], cache, peak)
        key = "cached" if cache else "uncached"
        out.setdefault(stage, {})[key] = figures
        print(f"{name:15s} {stage:10s} {key:8s} {figures['samples_per_s']:10.2f} samples/s, utilisation "
              f"{figures['utilisation']:.1%} (first epoch {figures['first_epoch']:.2f}; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    for stage in flops:
        out[stage].update({k: round(v, 3) for k, v in flops[stage].items()})
        if {"cached", "uncached"} <= set(out[stage]):
            runs_of = out[stage]
            runs_of["speedup"] = round(runs_of["cached"]["samples_per_s"] / runs_of["uncached"]["samples_per_s"], 2)
            print(f"{name:15s} {stage:10s} speed-up {runs_of['speedup']:.2f}x "
                  f"(FLOP ceiling {runs_of['speedup_ceiling']}x)", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper-vit-b-32")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda")
    parser.add_argument("--stages", default=",".join(dict.fromkeys(stage for stage, _ in RUNS)),
                        help="the stages to run (each uncached, and cached where it has a cache)")
    parser.add_argument("--micro-batch", type=int, default=32, help="samples per step")
    parser.add_argument("--paper-batches", type=int, default=2, help="micro-batches per epoch (paper configs)")
    parser.add_argument("--tiny-batches", type=int, default=16, help="micro-batches per epoch (tiny)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default); 1 is faster when other jobs share the cores")
    parser.add_argument("--avx2-only", action="store_true", help="cap every kernel library at AVX2 (rerun)")
    args = parser.parse_args(argv)
    if args.avx2_only:
        rerun_avx2_only()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = [(stage, cache) for stage, cache in RUNS if stage in args.stages.split(",")]
    print(describe(machine(args.device)), flush=True)
    start = time.perf_counter()
    figures = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "device": args.device}
    for name in args.configs.split(","):
        n = args.paper_batches if name.startswith("paper") else args.tiny_batches
        figures[name] = bench_config(name, n, args.micro_batch, args.precision, device, runs)
    paper = figures.get("paper-vit-b-32", {})
    figures["targets"] = {s: {"target": t, "measured": paper[s]["speedup"], "met": paper[s]["speedup"] >= t,
                              "ceiling": paper[s]["speedup_ceiling"]} for s, t in TARGETS.items()
                          if "speedup" in paper.get(s, {})}
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    figures["seconds"] = round(time.perf_counter() - start, 1)
    report("train_stages", figures, args.device)


if __name__ == "__main__":
    main()
