"""Forward-pass throughput of each part of CMA-CLIP, fp32 and bf16, random weights.

    python bench/forward.py --config paper-vit-b-32 [--batch 32]

Reports samples/s of the image tower, the text tower (full 77-token context and trimmed to the batch's
longest title), the sequence attention + heads, and the full forward. The sequence attention runs in the
layout scoring uses for that dtype on CPU (sequence-first for bf16) and is timed in the other layout too.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cmaclip  # noqa: E402
from cmaclip.transforms import image_size, tokenizer, trim_tokens  # noqa: E402
from common import report, samples_per_second, titles  # noqa: E402


def parts(model, images, full, trimmed):
    """The pieces to time, each a closure over the same inputs."""
    tokens = model.encode_tokens(images, trimmed)
    return {
        "image_tower": lambda: model.towers.encode_image_tokens(images),
        "text_tower_77": lambda: model.towers.encode_text_tokens(full),
        "text_tower_trimmed": lambda: model.towers.encode_text_tokens(trimmed),
        "sequence_attention_and_heads": lambda: model.classify(*model.fuse(tokens)),
        "forward_77": lambda: model(images, full),
        "forward_trimmed": lambda: model(images, trimmed),
    }


def measure(model, batch: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    config = model.config
    model = model.to(dtype)
    images = torch.randn(batch, 3, image_size(config), image_size(config), dtype=dtype)
    full = tokenizer(config)(titles(batch))
    trimmed = trim_tokens(full)
    sequence_first = dtype == torch.bfloat16  # as pipeline.scoring.predictor sets it on CPU
    model.sequence_attention.set_sequence_first(sequence_first)
    out = {"sequence_first": sequence_first}
    with torch.inference_mode():
        for name, fn in parts(model, images, full, trimmed).items():
            out[name] = round(samples_per_second(fn, batch, repeats), 2)
            print(f"{str(dtype):15s} {name:30s} {out[name]:8.2f} samples/s", flush=True)
        model.sequence_attention.set_sequence_first(not sequence_first)
        name = "sequence_attention_and_heads_other_layout"
        out[name] = round(samples_per_second(parts(model, images, full, trimmed)["sequence_attention_and_heads"],
                                             batch, repeats), 2)
        print(f"{str(dtype):15s} {name:30s} {out[name]:8.2f} samples/s", flush=True)
    model.sequence_attention.set_sequence_first(False)
    out["trimmed_tokens"] = int(trimmed.shape[1])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper-vit-b-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = cmaclip.load_config(args.config).with_tasks({"color": 17, "pattern": 12, "style": 21})
    torch.manual_seed(0)
    model = cmaclip.create_model(config, load_pretrained=False).eval()
    fp32 = measure(model, args.batch, torch.float32, args.repeats)
    bf16 = measure(model, args.batch, torch.bfloat16, args.repeats)
    ratios = {f"bf16_over_fp32_{k}": round(bf16[k] / fp32[k], 2) for k in fp32
              if k not in ("trimmed_tokens", "sequence_first")}
    report("forward", {"config": args.config, "batch": args.batch, "fp32": fp32, "bf16": bf16, **ratios,
                       "trim_speedup_fp32": round(fp32["forward_trimmed"] / fp32["forward_77"], 2)})


if __name__ == "__main__":
    main()
