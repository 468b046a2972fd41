"""The paper's experiments on a real catalog, as one fixed protocol (`run_protocol`): ingest with hash
splits, train CMA-CLIP and its variants with Algorithm 1, the CLIP baselines, the title-noise test
(paper/experiments.py), the ablation of each training choice (paper/ablations.py) and the attention maps;
then one results dict, written as JSON, markdown and an MLflow run.

Used by `cmaclip-paper` (`python -m paper`) and `bench/paper.py`; both take the flags of
`paper.options.add_arguments`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cmaclip.config import CMACLIPConfig

from .ablations import run_ablations
from .experiments import (EXPLAINED_VARIANTS, NOISY_VARIANTS, build_config, by_part, choose_threads,
                          clip_baselines, last_checkpoint, load_splits, noise_conditions, noise_stats,
                          prepare_dataset, run_key, run_variants, timed)
from .options import Options
from .outputs import finite, log_mlflow, write_reports


def machine() -> dict[str, Any]:
    import os
    import platform

    return {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}


def protocol_info(opts: Options, config: CMACLIPConfig, manifest: dict[str, Any], uri: str,
                  parameters: int) -> dict[str, Any]:
    from cmaclip.evaluate import resolve_precision
    from pipeline.tracking.tracker import code_version, dataset_fingerprint

    counts = manifest["counts"]
    return {
        "catalog": opts.catalog, "limit": opts.limit, "dataset_uri": uri, "tasks": list(config.tasks),
        "config": opts.config_name, "config_dict": config.to_dict(), "pretrained": config.clip.pretrained,
        "parameters_m": parameters / 1e6, "precision": resolve_precision(config.train.precision, opts.device),
        "target_precision": config.train.target_precision,
        "seeds": {"train": opts.seed, "swap": opts.swap_seed, "split": "md5(product_id)"},
        "stage_epochs": {s: st.epochs for s, st in config.train.stages.items()},
        "contrastive": {"epochs": opts.contrastive_epochs, "lr": opts.contrastive_lr},
        "data": {"input_fingerprint": manifest["input"]["fingerprint"],
                 "dataset_fingerprint": dataset_fingerprint(manifest), "rows_kept": counts["rows_kept"],
                 "rows_by_split": counts["rows_by_split"], "classes": {t: len(manifest["vocabularies"][t])
                                                                       for t in config.tasks}},
        "machine": machine(), "threads": opts.threads, "code_version": code_version(),
    }


def run_protocol(opts: Options) -> dict[str, Any]:
    """Everything, in order; returns the results dict (see paper/report.py for its use)."""
    started, timing = time.perf_counter(), {}
    choose_threads(opts.threads)
    with timed(timing, "ingest"):
        uri, manifest = prepare_dataset(opts)
        config = build_config(opts, manifest["vocabularies"])
        data = load_splits(uri, config, manifest["vocabularies"])
    run_dir = Path(opts.work_dir) / "runs" / run_key(config, manifest)
    conditions = noise_conditions(data.test, opts.swap_seed)
    models, tested, checkpoints = run_variants(config, data, conditions, run_dir, opts, timing)
    ablations = run_ablations(config, data, conditions, checkpoints, run_dir, opts, timing)
    with timed(timing, "clip-baselines"):
        models.update(clip_baselines(config, data, run_dir, opts))
    attention = []
    if "cma-clip" in checkpoints:
        from .attention_figures import attention_examples  # matplotlib: only when drawing
        with timed(timing, "attention"):
            attention = attention_examples(last_checkpoint(checkpoints["cma-clip"]), data.test, config,
                                           Path(opts.results_dir) / "attention", opts.attention_examples)
    parameters = next(m["parameters"] for m in models.values() if "parameters" in m)
    return {
        "protocol": protocol_info(opts, config, manifest, uri, parameters),
        "models": models, "robustness": by_part(tested, "test", NOISY_VARIANTS),
        "calibration": by_part(tested, "calibration", NOISY_VARIANTS),
        "contributions": by_part(tested, "contributions", EXPLAINED_VARIANTS),
        "ablations": ablations, "noise": noise_stats(data.test, conditions),
        "attention": attention, "run_dir": str(run_dir), "command": opts.command,
        "timing": {"total_s": time.perf_counter() - started, "parts": timing},
    }


def run_and_report(opts: Options) -> dict[str, Any]:
    """The one entry point of `cmaclip-paper` and bench/paper.py: run, write, log; the results."""
    results = run_protocol(opts)
    files = write_reports(results, opts)
    if opts.mlflow:
        results["mlflow_run_id"] = log_mlflow(results, files)
        write_reports(results, opts)  # the stored JSON names its MLflow run
    return finite(results)
