"""Shared helpers for the benchmarks: timing, titles, the machine (and an AVX2-only one on this one), FLOP
utilisation against the matmul peak measured in the same run, and the one-JSON-line report."""
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


def interleaved_samples_per_second(fns: dict[str, Callable[[], object]], batch: int, repeats: int = 3,
                                   warmup: int = 1) -> dict[str, float]:
    """Best-of-`repeats` throughput of each of `fns`, timed in rounds that run each once: on a shared machine
    a neighbour's load then hits them alike, and their ratios hold where one-after-the-other would not."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch / seconds for name, seconds in best.items()}


def cpu_model() -> str:
    """The CPU's model name: figures from an AVX2-only EPYC and an AVX-512 BF16 Xeon are not comparable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# An AVX2-only x86 CPU (EPYC before Zen 4, Xeon before Skylake-SP) on this one: every kernel library torch
# uses capped at AVX2, in the environment of a fresh process (each reads its cap once, at first use). bf16
# matmuls then run emulated at ~1-2 GFLOP/s against ~50-100 in fp32 on 1-2 cores, as on such a CPU.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def rerun_avx2_only() -> None:
    """Replace this process by the same command with the kernels capped at AVX2 (`AVX2_ONLY`); a no-op
    once capped. Call it before any torch kernel runs."""
    if all(os.environ.get(k) == v for k, v in AVX2_ONLY.items()):
        return
    argv = [a for a in sys.argv if a != "--avx2-only"]
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **AVX2_ONLY})


def machine(device: str = "cpu") -> dict:
    """What the figures ran on: the CPU (and any kernel caps), what it has natively, what scoring's 'auto'
    picks on it, and the GPU when `device` is one."""
    from cmaclip.precision import cpu_supports_bf16, cpu_supports_int8, resolve_precision

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpus": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "isa_caps": {k: os.environ[k] for k in AVX2_ONLY if k in os.environ},
           "bf16_native": cpu_supports_bf16(), "int8_kernels": cpu_supports_int8(),
           "auto_precision": resolve_precision("auto", device, inference=True),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def describe(info: dict) -> str:
    """`machine()` as the one line a bench prints first."""
    caps = "" if not info["isa_caps"] else (" capped at AVX2" if info["isa_caps"] == AVX2_ONLY
                                             else f" capped {info['isa_caps']}")
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"machine: {info['cpu']} ({info['cpus']} cpus, {info['cpu_capability']}{caps}), bf16 native "
            f"{info['bf16_native']}, scoring auto -> {info['auto_precision']}{gpu}, torch {info['torch']}, "
            f"{info['threads']} threads, load {info['load_avg_1m']}")


# --- FLOP utilisation: how close a figure is to this machine's limit, not only how fast -----------------

def flops_per_sample(fn: Callable[[], object], batch: int) -> float:
    """FLOPs of `fn` (torch's FlopCounter: matmuls, convolutions, attention) per sample of its batch. Count
    an fp32 model: int8 kernels are not counted, and the FLOPs do not depend on the dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused transformer-encoder kernel an eval-mode encoder takes is invisible to the counter: counted
    # with it, CMA-CLIP's sequence attention (half of paper-vit-b-32's FLOPs) would count as nothing.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / batch


def _matmul(precision: str, size: int, device: torch.device) -> Callable[[], object]:
    a = torch.randn(size, size, device=device)
    if precision == "int8":  # the kernel int8 scoring runs (cmaclip.int8)
        from cmaclip.int8 import Int8Linear
        linear = Int8Linear(torch.nn.Linear(size, size, bias=False))
        return lambda: linear(a)
    from cmaclip.precision import DTYPES
    a = a.to(DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=a.dtype)
    return lambda: a @ b


def matmul_peak_gflops(precision: str, device: str = "cpu", seconds: float = 1.0) -> float:
    """The best GFLOP/s of a square matmul in `precision` on this machine, now, with the threads as set:
    the limit a forward or training step in that precision is measured against. Repeats for about
    `seconds` (at least twice); an emulated bf16 matmul on an AVX2 CPU takes seconds each."""
    device = torch.device(device)
    size = 8192 if device.type == "cuda" else 1024
    fn, best, spent = _matmul(precision, size, device), float("inf"), 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn()
        sync()
        for i in range(1000):
            start = time.perf_counter()
            fn()
            sync()
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if i >= 1 and spent >= seconds:
                break
    return 2 * size ** 3 / best / 1e9


def utilisation(samples_per_s: float, flops_per_sample_: float, peak_gflops: float) -> dict[str, float]:
    """samples/s x FLOPs/sample against the matmul peak: the share of the machine's limit a figure uses."""
    achieved = samples_per_s * flops_per_sample_ / 1e9
    return {"gflop_per_sample": round(flops_per_sample_ / 1e9, 3), "achieved_gflops": round(achieved, 2),
            "peak_gflops": round(peak_gflops, 1), "utilisation": round(achieved / peak_gflops, 4)}


def report(name: str, figures: dict, device: str = "cpu") -> None:
    """The last line of every benchmark: one JSON object, so runs can be compared over time."""
    print(json.dumps({"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(device),
                      **figures}, sort_keys=True))
