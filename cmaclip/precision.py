"""The precision policy, one for training, evaluation and scoring: which of fp32, bf16 and fp16 to run in on
a device, and the autocast context or weight dtype that goes with it."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 matmuls (AVX-512 BF16 or AMX). Elsewhere bf16 is emulated and
    slower than fp32, so 'auto' must not pick it."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        try:
            return bool(check())
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(precision: str) -> str:
    """`precision` itself if it is one of PRECISIONS, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'auto' -> what is fast and safe on this device: bf16 where the hardware has it, fp16 on GPUs without
    bf16, fp32 otherwise. fp16 on CPU is refused: there are no fast fp16 kernels there, so it runs many
    times slower than fp32."""
    check_precision(precision)
    kind = torch.device(device).type
    if precision == "fp16" and kind == "cpu":
        raise ValueError("fp16 on CPU has no fast kernels and runs far slower than fp32; "
                         "use precision 'bf16' or 'fp32'")
    if precision != "auto":
        return precision
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast(device: str | torch.device, precision: str):
    """Autocast context for a resolved precision; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
