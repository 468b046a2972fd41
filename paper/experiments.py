"""The parts of the paper's experiments on a real catalog: ingest with hash splits, train CMA-CLIP and its
variants with Algorithm 1, the CLIP baselines, the title-noise test (with the stored thresholds' precision
and the modality contributions under each title condition). `paper.protocol` runs them in order, with the
ablation of each training choice (paper/ablations.py) and the attention maps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import cmaclip
from cmaclip.config import ALL_STAGES, CMACLIPConfig, with_variant
from cmaclip.corruption import names_label, remove_label_words
from cmaclip.evaluate import evaluate, precision_at_thresholds
from cmaclip.explain import mean_contributions
from cmaclip.transforms import tokenizer
from pipeline.ingest.dataset import SPLITS, ingest

from .noise import swap_titles
from .options import VARIANTS, Options
from .splits import SplitData, load_split, retitled, subset_catalog

NOISY_VARIANTS = VARIANTS  # image-only doubles as a check: title noise must not move it
EXPLAINED_VARIANTS = ("cma-clip", "no-modality-attention")  # fused: what each modality contributes is the question


# --- set-up -------------------------------------------------------------------------------------------

def build_config(opts: Options, vocab: dict[str, list[str]]) -> CMACLIPConfig:
    """The protocol's config: the named file, the dataset's tasks, and the flags that override it."""
    config = cmaclip.load_config(opts.config_name).with_tasks({t: len(vocab[t]) for t in opts.tasks})
    clip = dataclasses.replace(config.clip, pretrained=opts.pretrained or config.clip.pretrained)
    stages = {name: dataclasses.replace(s, epochs=opts.epochs.get(name, s.epochs))
              for name, s in config.train.stages.items()}
    train = dataclasses.replace(config.train, seed=opts.seed, stages=stages,
                                precision=opts.precision or config.train.precision)
    return dataclasses.replace(config, clip=clip, train=train)


def prepare_dataset(opts: Options) -> tuple[str, dict[str, Any]]:
    """Ingest the catalog (or its first `limit` rows in hash order) with hash splits; (uri, manifest)."""
    work = Path(opts.work_dir)
    catalog = opts.catalog
    if opts.limit:
        catalog = subset_catalog(catalog, opts.limit, work / f"catalog-first-{opts.limit}.parquet")
    uri = str(work / (f"dataset-first-{opts.limit}" if opts.limit else "dataset"))
    manifest = ingest(catalog, list(opts.tasks), uri)
    return uri, manifest


def run_key(config: CMACLIPConfig, manifest: dict[str, Any]) -> str:
    """Checkpoint folder name: same config and data -> same folder, so an interrupted run resumes."""
    from pipeline.tracking.tracker import dataset_fingerprint
    content = json.dumps({"config": config.to_dict(), "data": dataset_fingerprint(manifest)}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:12]


def new_model(config: CMACLIPConfig, seed: int) -> cmaclip.CMACLIP:
    """Every variant and the CLIP baseline build CLIP first from the same seed: identical CLIP weights."""
    torch.manual_seed(seed)
    return cmaclip.create_model(config)


# --- metrics ------------------------------------------------------------------------------------------

PER_TASK = ("n", "accuracy", "macro_f1", "recall_at_precision", "image_weight")
MEANS = ("mean_recall_at_precision", "mean_accuracy", "mean_macro_f1")


def nested(flat: dict[str, float], tasks: Sequence[str]) -> dict[str, Any]:
    """evaluate's flat metrics -> {task: {metric: value}, mean_*: value}."""
    out: dict[str, Any] = {t: {k: flat[f"{t}/{k}"] for k in PER_TASK if f"{t}/{k}" in flat} for t in tasks}
    out.update({k: flat[k] for k in MEANS if k in flat})
    return out


@contextlib.contextmanager
def timed(timing: dict[str, float], key: str):
    """Adds the block's wall time to timing[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start


# --- title noise (Table 5) ----------------------------------------------------------------------------

def noise_conditions(test: SplitData, swap_seed: int) -> dict[str, list[str | None]]:
    """The test titles under each condition, in test order."""
    return {"clean": list(test.titles),
            "label_words_removed": [remove_label_words(t, labels)
                                    for t, labels in zip(test.titles, test.product_labels(), strict=True)],
            "titles_swapped": swap_titles(test.titles, swap_seed)}


def noise_stats(test: SplitData, conditions: dict[str, list[str | None]]) -> dict[str, Any]:
    """How often the test titles name each task's label, per condition, and how many titles changed."""
    named = {}
    for cond, titles in conditions.items():
        named[cond] = {}
        for task, labels in test.labels.items():
            has = np.array([lab is not None for lab in labels])
            named[cond][task] = float(names_label(titles, labels)[has].mean()) if has.any() else float("nan")
    changed = {c: float(np.mean([a != b for a, b in zip(test.titles, t)])) for c, t in conditions.items()}
    return {"label_named": named, "titles_changed": changed}


def evaluate_conditions(model, thresholds: dict[str, float], test: SplitData,
                        conditions: dict[str, list[str | None]], config: CMACLIPConfig, opts: Options,
                        explain: bool = False) -> dict[str, dict[str, Any]]:
    """Per title condition: `test` metrics, in fp32 so the reported numbers do not depend on the machine's
    bf16 support; `calibration`, the precision and coverage reached at the checkpoint's stored
    `thresholds` (calibrated on validation, original titles); with `explain`, the mean modality
    `contributions` (cmaclip.explain: three forward passes, so only where asked)."""
    tokenize = tokenizer(config)
    out = {}
    for cond, titles in conditions.items():
        by_id = dict(zip(test.product_id, titles))
        flat, preds = evaluate(model, retitled(test.batches(opts.eval_batch_size), by_id, tokenize),
                               config.train.target_precision, device=opts.device, precision="fp32")
        out[cond] = {"test": nested(flat, list(config.tasks)),
                     "calibration": precision_at_thresholds(preds, thresholds)}
        if explain:
            out[cond]["contributions"] = mean_contributions(
                model, retitled(test.batches(opts.eval_batch_size), by_id, tokenize), opts.device)
    return out


def by_part(tested: dict[str, dict[str, dict[str, Any]]], part: str,
            variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{variant: {condition: results}} -> {variant: {condition: that part}}, for the variants named."""
    return {v: {c: r[part] for c, r in runs.items()} for v, runs in tested.items() if v in variants}


# --- CMA-CLIP and its variants (Tables 2 and 6) --------------------------------------------------------

@dataclass
class Splits:
    train: SplitData
    validation: SplitData
    test: SplitData
    vocab: dict[str, list[str]]


def load_splits(uri: str, config: CMACLIPConfig, vocab: dict[str, list[str]]) -> Splits:
    return Splits(*(load_split(uri, s, config, vocab) for s in SPLITS), vocab=vocab)


def choose_threads(policy: str) -> int:
    """Set torch's thread count. "auto": all cores on an idle machine, one when other processes already
    keep the cores busy: there OpenMP's threads wait on each other at every barrier, and one thread ran
    2-3x faster than two (measured on this 2-core machine at load 12). Thread count changes no result
    beyond float rounding."""
    import os

    cores = os.cpu_count() or 1
    if policy != "auto":
        n = int(policy)
    else:
        n = cores if os.getloadavg()[0] <= cores + 0.5 else 1
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def epochs_with_threads(factory: Callable[[int], Any], policy: str) -> Callable[[int], Any]:
    """The trainer calls the loader factory at the start of every epoch: the moment to re-check the load."""
    def batches(epoch: int):
        choose_threads(policy)
        return factory(epoch)
    return batches


def _printer(prefix: str) -> Callable[[str], None]:
    return lambda line: print(f"[{prefix}] {line}", flush=True)


def stage_summary(result) -> dict[str, Any]:
    history = result.history
    return {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "val_mean_recall_at_precision": result.best_metrics.get("mean_recall_at_precision"),
            "val_mean_accuracy": result.best_metrics.get("mean_accuracy"),
            "train_seconds": float(sum(h.get("train/seconds", 0.0) for h in history)),
            "train_samples_per_s": float(np.mean([h["train/samples_per_s"] for h in history])) if history else None}


def trained_stages(config: CMACLIPConfig) -> list[str]:
    """The stages a protocol training runs: align when it has epochs, then Algorithm 1's three."""
    return [s for s in ALL_STAGES if config.train.stages[s].epochs > 0]


def train_variant(variant: str, config: CMACLIPConfig, data: Splits, out_dir: Path, opts: Options, *,
                  init: Path | None = None, stages: Sequence[str] | None = None
                  ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Train one variant into out_dir/<stage>; (best checkpoint per stage in order, summary). By default
    every trained stage from a new model; `init` (a checkpoint) and `stages` run only the later stages, as
    an ablation that reuses another run's earlier ones does. Progress lines are prefixed by out_dir's name."""
    from cmaclip.train import PrintCallback, train_stages

    vconfig = with_variant(config, variant)
    stages = trained_stages(vconfig) if stages is None else list(stages)
    train = {s: epochs_with_threads(data.train.epochs(config.train.micro_batch_size, opts.seed, s, vconfig),
                                    opts.threads)
             for s in stages}  # per stage: each has its own title corruption and image augmentation
    results = train_stages(
        vconfig, init or (lambda: new_model(vconfig, opts.seed)), train,
        data.validation.batches(opts.eval_batch_size), out_dir, stages=stages,
        callbacks=[PrintCallback(_printer(out_dir.name))], cache="memory", device=opts.device, labels=data.vocab,
        resume=True)
    return ({s: r.best_checkpoint for s, r in results.items()},
            {"stages": {s: stage_summary(r) for s, r in results.items()}})


def last_checkpoint(checkpoints: dict[str, Path]) -> Path:
    """The best checkpoint of the last stage: the trained model."""
    return list(checkpoints.values())[-1]


def run_variants(config: CMACLIPConfig, data: Splits, conditions: dict[str, list[str | None]],
                 run_dir: Path, opts: Options, timing: dict[str, float]):
    """Train and test every variant; (models, {variant: evaluate_conditions' results}, {variant: {stage:
    best checkpoint}})."""
    from cmaclip.checkpoint import load_checkpoint

    models, tested, checkpoints = {}, {}, {}
    for variant in opts.variants:
        with timed(timing, variant):
            checkpoints[variant], summary = train_variant(variant, config, data, run_dir / variant, opts)
            model, ckpt = load_checkpoint(last_checkpoint(checkpoints[variant]), device=opts.device)
            tested[variant] = evaluate_conditions(
                model, ckpt.thresholds, data.test,
                conditions if variant in NOISY_VARIANTS else {"clean": conditions["clean"]}, config, opts,
                explain=variant in EXPLAINED_VARIANTS)
        summary["test"] = tested[variant]["clean"]["test"]
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        models[variant] = summary
        _printer(variant)(f"test mean recall {summary['test']['mean_recall_at_precision']:.4f} "
                          f"mean accuracy {summary['test']['mean_accuracy']:.4f}")
    return models, tested, checkpoints


# --- CLIP baselines (Table 2) ---------------------------------------------------------------------------

NO_WEIGHTS = "no pretrained CLIP weights (random init); pass --pretrained <path> to run it"


def new_towers(config: CMACLIPConfig, seed: int):
    """CLIP towers with the same starting weights as every CMA-CLIP variant (see `new_model`)."""
    from cmaclip.encoders import CLIPTowers
    from cmaclip.pretrained import create_clip

    torch.manual_seed(seed)
    return CLIPTowers(create_clip(config.clip))


def zero_shot_metrics(towers, data: Splits, config: CMACLIPConfig, opts: Options) -> dict[str, Any]:
    from cmaclip.clip_baseline import zero_shot_predict
    from cmaclip.evaluate import metrics_from_predictions

    classes = {t: data.vocab[t] for t in config.tasks}
    preds = zero_shot_predict(towers, data.test.batches(opts.eval_batch_size), classes, tokenizer(config),
                              precision="fp32", device=opts.device)
    return nested(metrics_from_predictions(preds, config.train.target_precision), list(config.tasks))


def finetuned_towers(config: CMACLIPConfig, data: Splits, opts: Options, out_dir: Path):
    """(towers, loss per epoch): contrastive fine-tuning, or its stored result from an earlier run with
    the same config, data and options (the folder name is a function of them)."""
    from safetensors.torch import load_model, save_model

    from cmaclip.clip_baseline import finetune_contrastive

    towers = new_towers(config, opts.seed)
    weights, meta = out_dir / "towers.safetensors", out_dir / "losses.json"
    settings_key = {"epochs": opts.contrastive_epochs, "lr": opts.contrastive_lr, "seed": opts.seed}
    if meta.exists() and json.loads(meta.read_text()).get("settings") == settings_key:
        load_model(towers, str(weights))
        return towers, json.loads(meta.read_text())["losses"]
    losses = finetune_contrastive(
        towers, epochs_with_threads(data.train.epochs(config.train.micro_batch_size, opts.seed), opts.threads),
        epochs=opts.contrastive_epochs,
        lr=opts.contrastive_lr, weight_decay=config.train.weight_decay, grad_clip=config.train.grad_clip,
        precision=config.train.precision, device=opts.device, log=_printer("fine-tuned-clip"))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(towers, str(weights))
    meta.write_text(json.dumps({"settings": settings_key, "losses": losses}))
    return towers, losses


def clip_baselines(config: CMACLIPConfig, data: Splits, run_dir: Path, opts: Options) -> dict[str, Any]:
    """Raw CLIP zero-shot (pretrained weights only) and CLIP fine-tuned contrastively on the training
    image-title pairs, then zero-shot."""
    from cmaclip.clip_baseline import templates_for, title_retrieval

    templates = {t: list(templates_for(t)) for t in config.tasks}
    out: dict[str, Any] = {"raw-clip": {"not_run": NO_WEIGHTS}}
    if config.clip.pretrained:
        out["raw-clip"] = {"test": zero_shot_metrics(new_towers(config, opts.seed), data, config, opts),
                           "templates": templates}
    towers, losses = finetuned_towers(config, data, opts, run_dir / "fine-tuned-clip")
    out["fine-tuned-clip"] = {"test": zero_shot_metrics(towers, data, config, opts),
                              "title_retrieval": title_retrieval(towers, data.test.batches(opts.eval_batch_size),
                                                                 opts.device),
                              "contrastive_loss": losses, "templates": templates}
    return out
