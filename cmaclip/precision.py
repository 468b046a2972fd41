"""The precision policy, one for training, evaluation and scoring: which of fp32, bf16, fp16 (and, for
inference, int8 weights) to run in on a device, and the autocast context or weight dtype that goes with it.
The names are `cmaclip.config.PRECISIONS` and `INFERENCE_PRECISIONS`. Also what device 'auto' means."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import INFERENCE_PRECISIONS, PRECISIONS

# The dtype of the float weights and inputs. int8 quantizes the matmuls of the towers and the sequence
# attention (cmaclip.int8); what stays float around them (inputs, norms, heads) is fp32.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


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


def cpu_supports_int8() -> bool:
    """True where torch has fbgemm's int8 matmuls (x86: AVX2 and up), which cmaclip.int8 runs on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where CUDA is available, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked against
    this machine, so a typo or a missing GPU fails before a model loads or a run writes anything."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = device.partition(":")
    if device != "cpu" and not (kind == "cuda" and (not colon or index.isdigit())):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_precision(precision: str, inference: bool = False) -> str:
    """`precision` itself if a run may ask for it (int8 only for `inference`), else a ValueError."""
    if precision == "int8" and not inference:
        raise ValueError("int8 weights are for inference (scoring) only; train in 'auto', 'fp32', 'bf16' or 'fp16'")
    choices = INFERENCE_PRECISIONS if inference else PRECISIONS
    if precision not in choices:
        raise ValueError(f"precision must be one of {choices}, not {precision!r}")
    return precision


def resolve_precision(precision: str, device: str | torch.device, inference: bool = False) -> str:
    """'auto' -> what is fast and safe on this device: bf16 where the hardware has it, fp16 on GPUs without
    bf16; on CPUs without it (AVX2-only x86) int8 weights for `inference` (1.6-1.7x fp32's forward, top-1
    within 1% of fp32's: docs/benchmarks.md), else fp32. fp16 on CPU is refused: there are no fast fp16
    kernels there, so it runs many times slower than fp32; int8 off the CPU is refused: its kernels are x86's."""
    check_precision(precision, inference)
    kind = torch.device(device).type
    if precision == "fp16" and kind == "cpu":
        raise ValueError("fp16 on CPU has no fast kernels and runs far slower than fp32; "
                         "use precision 'bf16' or 'fp32'")
    if precision == "int8" and (kind != "cpu" or not cpu_supports_int8()):
        raise ValueError(f"int8 weights need an x86 CPU (fbgemm); on {kind} use 'auto', 'bf16' or 'fp32'")
    if precision != "auto":
        return precision
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and cpu_supports_bf16():
        return "bf16"
    if kind == "cpu" and inference and cpu_supports_int8():
        return "int8"
    return "fp32"


def autocast(device: str | torch.device, precision: str):
    """Autocast context for a resolved training precision; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
