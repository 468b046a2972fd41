"""Shared helpers for the benchmarks: timing, titles, and the one-JSON-line report."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable

import torch

# Product-title-like strings: short, as in retail catalogs (the longest here is ~20 tokens).
TITLES = [
    "Women Navy Blue Striped Round Neck T-shirt",
    "Puma Men Black Running Shoes",
    "Fabindia Women Red Printed Kurta with Dupatta and Palazzos Set",
    "Titan Men Silver Dial Analog Watch",
    "Nike Unisex Grey Solid Cap",
    "Lavie Women Brown Handbag",
    "Jockey Men Pack of 2 White Briefs",
    "Catwalk Women Gold Toned Embellished Heels",
]


def titles(n: int) -> list[str]:
    return [TITLES[i % len(TITLES)] for i in range(n)]


def samples_per_second(fn: Callable[[], object], batch: int, repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeats` throughput: the least disturbed run is the closest to what the code can do."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch / best


def cpu_model() -> str:
    """The CPU's model name: figures from an AVX2-only EPYC and an AVX-512 BF16 Xeon are not comparable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    from cmaclip.precision import cpu_supports_bf16

    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "bf16_native": cpu_supports_bf16(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def report(name: str, figures: dict) -> None:
    """The last line of every benchmark: one JSON object, so runs can be compared over time."""
    print(json.dumps({"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **figures},
                     sort_keys=True))
