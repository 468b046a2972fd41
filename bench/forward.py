"""Forward-pass throughput of each part of CMA-CLIP in each precision (fp32, int8 weights, bf16 where the CPU
has it natively), random weights, with the FLOP utilisation of each.

    python bench/forward.py --config paper-vit-b-32 [--batch 32] [--precisions fp32,int8,bf16] [--avx2-only]

Reports samples/s of the image tower, the text tower (full 77-token context and trimmed to the batch's
longest title), the sequence attention + heads, and the full forward; each part's GFLOP per sample (torch's
FlopCounter, counted in fp32) and its utilisation: samples/s x FLOPs/sample over the matmul peak of its
precision, measured in the same run. The precisions run interleaved, part by part, so their ratios hold on a
shared machine. The sequence attention runs in the layout scoring uses for that
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
from common import (describe, flops_per_sample, interleaved_samples_per_second, machine,  # noqa: E402
                    matmul_peak_gflops, report, rerun_avx2_only, titles, utilisation)

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
    """A copy of the model as scoring runs it in `precision` (pipeline.scoring.predictor): bf16 weights and
    the sequence-first layout, or int8 matmuls, or as is."""
    copied = copy.deepcopy(model)
    prepared = quantize_model(copied) if precision == "int8" else copied.to(DTYPES[precision])
    prepared.sequence_attention.set_sequence_first(precision == "bf16")
    return prepared


def measure(model, batch: int, precisions: list[str], repeats: int) -> dict[str, dict]:
    """Each part in each precision, the precisions interleaved part by part (bench/common.py), so the ratios
    between them hold on a shared machine."""
    models = {p: in_precision(model, p) for p in precisions}
    data = {p: inputs(model.config, batch, DTYPES[p]) for p in precisions}
    pieces = {p: parts(models[p], *data[p]) for p in precisions}
    out = {p: {"sequence_first": p == "bf16"} for p in precisions}
    with torch.inference_mode():
        for name in pieces[precisions[0]]:
            rates = interleaved_samples_per_second({p: pieces[p][name] for p in precisions}, batch, repeats)
            for p, rate in rates.items():
                out[p][name] = round(rate, 2)
            print(f"{name:42s} " + "  ".join(f"{p} {r:8.2f}" for p, r in rates.items()) + " samples/s", flush=True)
        for p in precisions:
            models[p].sequence_attention.set_sequence_first(p != "bf16")
        name = "sequence_attention_and_heads_other_layout"
        other = {p: parts(models[p], *data[p])["sequence_attention_and_heads"] for p in precisions}
        for p, rate in interleaved_samples_per_second(other, batch, repeats).items():
            out[p][name] = round(rate, 2)
    for p in precisions:
        out[p]["trimmed_tokens"] = int(data[p][2].shape[1])
    return out


def default_precisions() -> list[str]:
    """fp32, int8 where its kernels exist, bf16 where it is native (emulated bf16 takes minutes a batch)."""
    return ["fp32", *(["int8"] if cpu_supports_int8() else []), *(["bf16"] if cpu_supports_bf16() else [])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper-vit-b-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", help="comma-separated (default: fp32, int8 where it runs, bf16 if native)")
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
    for precision, measured in measure(model, args.batch, precisions, args.repeats).items():
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
