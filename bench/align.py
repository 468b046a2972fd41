"""Does the catalog pre-training (`align`) help? Each variant trained twice on the same data, seed and
stages, without and with `--align-epochs` of align first; test accuracy with the original titles and with
the label words removed (the paper protocol's data, splits and noise: paper/experiments.py).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/align.py --limit 6000 --variants image-only --align-epochs 2

Takes the paper protocol's flags (bench/paper.py); prints one JSON line with every figure last.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repo root ahead of bench/: `paper` is the package, not bench/paper.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import report  # noqa: E402
from paper.options import add_arguments, options_from_args  # noqa: E402

CONDITIONS = ("clean", "label_words_removed")


def run_variant(variant: str, config, data, conditions, manifest: dict, opts) -> dict:
    from cmaclip.checkpoint import load_checkpoint
    from paper.experiments import evaluate_conditions, last_checkpoint, run_key, train_variant

    started = time.perf_counter()
    run_dir = Path(opts.work_dir) / "runs" / run_key(config, manifest)
    checkpoints, summary = train_variant(variant, config, data, run_dir / variant, opts)
    model, ckpt = load_checkpoint(last_checkpoint(checkpoints), device=opts.device)
    tested = evaluate_conditions(model, ckpt.thresholds, data.test, {c: conditions[c] for c in CONDITIONS},
                                 config, opts)
    test = {c: r["test"] for c, r in tested.items()}
    out = {"test": {c: {**{t: round(100 * m[t]["accuracy"], 1) for t in config.tasks},
                        "mean_accuracy": round(100 * m["mean_accuracy"], 1),
                        "mean_recall_at_precision": round(100 * m["mean_recall_at_precision"], 1)}
                    for c, m in test.items()},
           "minutes": round((time.perf_counter() - started) / 60, 1)}
    align = summary["stages"].get("align")
    if align is not None:
        from cmaclip.train import read_stage_result
        best = read_stage_result(run_dir / variant / "align").best_metrics
        out["align_val"] = {k: round(best[k], 4) for k in ("image_to_title_recall_at_1",
                                                           "image_to_title_recall_at_5", "loss", "n")}
    return out


def main(argv: list[str] | None = None) -> None:
    from paper.experiments import build_config, choose_threads, load_splits, noise_conditions, prepare_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--align-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    opts = options_from_args(args, "bench/align.py")
    choose_threads(opts.threads)
    uri, manifest = prepare_dataset(opts)
    without = build_config(opts, manifest["vocabularies"])
    data = load_splits(uri, without, manifest["vocabularies"])
    stages = dict(without.train.stages, align=dataclasses.replace(without.train.stages["align"],
                                                                  epochs=args.align_epochs))
    with_align = dataclasses.replace(without, train=dataclasses.replace(without.train, stages=stages))
    conditions = noise_conditions(data.test, opts.swap_seed)
    figures = {"limit": opts.limit, "rows_by_split": manifest["counts"]["rows_by_split"],
               "stage_epochs": {s: st.epochs for s, st in with_align.train.stages.items()}, "variants": {}}
    for variant in opts.variants:
        figures["variants"][variant] = {
            "without_align": run_variant(variant, without, data, conditions, manifest, opts),
            "with_align": run_variant(variant, with_align, data, conditions, manifest, opts)}
    report("align", figures)


if __name__ == "__main__":
    main()
