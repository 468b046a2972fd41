"""Forward-pass throughput of each part of CMA-CLIP in each precision (fp32, int8 weights, bf16 where the CPU
has it natively), random weights, with the FLOP utilisation of each.

    python bench/forward.py --config paper-vit-b-32 [--batch 32] [--precisions fp32,int8,bf16] [--avx2-only]

Reports samples/s of the image tower, the text tower (full 77-token context and trimmed to the batch's
longest title), the sequence attention + heads, and the full forward; each part's GFLOP per sample (torch's
FlopCounter, counted in fp32) and its utilisation: samples/s x FLOPs/sample over the matmul peak of its
precision, measured in the same run. The sequence attention runs in the layout scoring uses for that
precision on CPU (sequence-first for bf16) and is timed in the other layout too. `--avx2-only` reruns the
bench with every kernel library capped at AVX2 (bench/common.py: an AVX2-only CPU on this one). The last
line is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cmaclip  # noqa: E402
from cmaclip.int8 import quantize_model  # noqa: E402
from cmaclip.precision import DTYPES, cpu_supports_bf16, cpu_supports_int8  # noqa: E402
from cmaclip.transforms import image_size, tokenizer, trim_tokens  # noqa: E402
from common import (describe, flops_per_sample, machine, matmul_peak_gflops, report, rerun_avx2_only,  # noqa: E402
                    samples_per_second, titles, utilisation)

FULL = "forward_trimmed"  # what scoring runs: the whole model on titles trimmed to the batch's longest


def parts(model, images, full, trimmed):
    """The pieces to time, each a closure over the same inputs."""
    tokens = model.encode_tokens(images, trimmed)
    return {
        "image_tower": lambda: model.towers.encode_image_tokens(images),
        "text_tower_77": lambda: model.towers.encode_text_tokens(full),
        "text_tower_trimmed": lambda: model.towers.encode_text_tokens(trimmed),
        "sequence_attention_and_heads": lambda: model.classify(*model.fuse(tokens)),
        "forward_77": lambda: model(images, full),
        FULL: lambda: model(images, trimmed),
    }


def inputs(config, batch: int, dtype: torch.dtype):
    images = torch.randn(batch, 3, image_size(config), image_size(config), generator=torch.Generator().manual_seed(0))
    full = tokenizer(config)(titles(batch))
    return images.to(dtype), full, trim_tokens(full)


def count_flops(model, batch: int) -> dict[str, float]:
    """FLOPs per sample of each part, on the fp32 model."""
    with torch.inference_mode():
        pieces = parts(model, *inputs(model.config, batch, torch.float32))
        return {name: flops_per_sample(fn, batch) for name, fn in pieces.items()}


def in_precision(model, precision: str):
    """The model as scoring runs it in `precision` (pipeline.scoring.predictor): bf16 weights, or int8 matmuls
    on a copy of the fp32 model."""
    if precision == "int8":
        return quantize_model(copy.deepcopy(model).float())
    return model.to(DTYPES[precision])


def measure(model, batch: int, precision: str, repeats: int) -> dict[str, float]:
    images, full, trimmed = inputs(model.config, batch, DTYPES[precision])
    sequence_first = precision == "bf16"  # as pipeline.scoring.predictor sets it on CPU
    model.sequence_attention.set_sequence_first(sequence_first)
    out = {"sequence_first": sequence_first}
    with torch.inference_mode():
        for name, fn in parts(model, images, full, trimmed).items():
            out[name] = round(samples_per_second(fn, batch, repeats), 2)
            print(f"{precision:5s} {name:40s} {out[name]:8.2f} samples/s", flush=True)
        model.sequence_attention.set_sequence_first(not sequence_first)
        name = "sequence_attention_and_heads_other_layout"
        out[name] = round(samples_per_second(parts(model, images, full, trimmed)["sequence_attention_and_heads"],
                                             batch, repeats), 2)
        print(f"{precision:5s} {name:40s} {out[name]:8.2f} samples/s", flush=True)
    model.sequence_attention.set_sequence_first(False)
    out["trimmed_tokens"] = int(trimmed.shape[1])
    return out


def default_precisions() -> list[str]:
    """fp32, int8 where its kernels exist, bf16 where it is native (emulated bf16 takes minutes a batch)."""
    return ["fp32", *(["int8"] if cpu_supports_int8() else []), *(["bf16"] if cpu_supports_bf16() else [])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper-vit-b-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", help="comma-separated, fp32 first (default: fp32, int8, bf16 if native)")
    parser.add_argument("--avx2-only", action="store_true", help="cap every kernel library at AVX2 (rerun)")
    args = parser.parse_args(argv)
    if args.avx2_only:
        rerun_avx2_only()
    precisions = args.precisions.split(",") if args.precisions else default_precisions()
    print(describe(machine()), flush=True)
    config = cmaclip.load_config(args.config).with_tasks({"color": 17, "pattern": 12, "style": 21})
    torch.manual_seed(0)
    model = cmaclip.create_model(config, load_pretrained=False).eval()
    flops = count_flops(model, args.batch)
    peaks = {p: round(matmul_peak_gflops(p), 1) for p in precisions}
    print(f"matmul peak GFLOP/s: {peaks}; GFLOP/sample: {FULL} {flops[FULL] / 1e9:.2f}", flush=True)
    figures = {"config": args.config, "batch": args.batch, "precisions": precisions, "matmul_peak_gflops": peaks,
               "gflop_per_sample": {k: round(v / 1e9, 3) for k, v in flops.items()}}
    for precision in sorted(precisions, key=lambda p: p != "fp32"):  # fp32 first: int8 copies the fp32 model
        measured = measure(in_precision(model, precision), args.batch, precision, args.repeats)
        measured["utilisation"] = {k: utilisation(measured[k], flops[k], peaks[precision])["utilisation"]
                                   for k in flops}
        figures[precision] = measured
        print(f"{precision:5s} utilisation of {FULL}: {measured['utilisation'][FULL]:.1%}", flush=True)
    for precision in precisions:
        if precision != "fp32" and "fp32" in figures:
            figures[f"{precision}_over_fp32"] = {k: round(figures[precision][k] / figures["fp32"][k], 2) for k in flops}
    if "fp32" in figures:
        figures["trim_speedup_fp32"] = round(figures["fp32"][FULL] / figures["fp32"]["forward_77"], 2)
    report("forward", figures)


if __name__ == "__main__":
    main()
