"""Ablation of each training choice of the protocol's config: what each one adds or costs (issue 13).

The list is the config's, not a hand-kept one: each group of `cmaclip.config.TRAINING_CHOICES` (title
corruption, image augmentation, the modality loss) that some trained stage turns on is reset to
StageConfig's defaults in every stage, and the align stage, when it has epochs, is dropped. One line per
choice, as a user would switch it off. CMA-CLIP is trained under each ablated config starting from the full
run's best checkpoint of the last stage the ablation leaves unchanged, so ablating a tuning-only choice
costs one tuning stage, not a whole training.
Each is tested under the same title conditions as the full model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmaclip.config import ALIGN, TRAINING_CHOICES, CMACLIPConfig, StageConfig

from .experiments import Splits, evaluate_conditions, last_checkpoint, timed, train_variant, trained_stages
from .options import Options

VARIANT = "cma-clip"  # the model whose training choices are ablated
ALIGN_GROUP = "align stage"


@dataclass
class Ablation:
    group: str                          # a TRAINING_CHOICES group, or ALIGN_GROUP
    removed: dict[str, dict[str, Any]]  # stage -> the settings it takes away, as the full config has them
    config: CMACLIPConfig               # the full config without them

    @property
    def name(self) -> str:
        return self.group.replace(" ", "-")

    @property
    def stages(self) -> list[str]:
        return list(self.removed)


def with_stages(config: CMACLIPConfig, changed: dict[str, StageConfig]) -> CMACLIPConfig:
    stages = {**config.train.stages, **changed}
    return dataclasses.replace(config, train=dataclasses.replace(config.train, stages=stages))


def ablations(config: CMACLIPConfig) -> list[Ablation]:
    """One ablation per choice group some trained stage turns on (in TRAINING_CHOICES order), then align's."""
    out, stages = [], config.train.stages
    for group in TRAINING_CHOICES:
        removed = {s: stages[s].choices_on()[group] for s in trained_stages(config)
                   if group in stages[s].choices_on()}
        if removed:
            out.append(Ablation(group, removed, with_stages(config, {s: stages[s].without(group) for s in removed})))
    if stages[ALIGN].epochs > 0:
        out.append(Ablation(ALIGN_GROUP, {ALIGN: {"epochs": stages[ALIGN].epochs}},
                            with_stages(config, {ALIGN: dataclasses.replace(stages[ALIGN], epochs=0)})))
    return out


def reused_stages(config: CMACLIPConfig, ablated: CMACLIPConfig) -> list[str]:
    """The full run's stages before the first one the ablation changes: their checkpoints stand as they are."""
    stages = trained_stages(config)
    changed = [i for i, s in enumerate(stages) if config.train.stages[s] != ablated.train.stages[s]]
    return stages[:changed[0]] if changed else stages


def run_ablation(ablation: Ablation, config: CMACLIPConfig, data: Splits,
                 conditions: dict[str, list[str | None]], full: dict[str, Path], run_dir: Path,
                 opts: Options) -> dict[str, Any]:
    """Train CMA-CLIP under the ablated config from the full run's last reused checkpoint (`full`: the full
    run's best checkpoint per stage) and test it under every title condition."""
    from cmaclip.checkpoint import load_checkpoint

    reused = reused_stages(config, ablation.config)
    init = full[reused[-1]] if reused else None
    stages = [s for s in trained_stages(ablation.config) if s not in reused]
    checkpoints, summary = train_variant(VARIANT, ablation.config, data, run_dir / "ablations" / ablation.name,
                                         opts, init=init, stages=stages)
    model, ckpt = load_checkpoint(last_checkpoint(checkpoints), device=opts.device)
    tested = evaluate_conditions(model, ckpt.thresholds, data.test, conditions, ablation.config, opts)
    return {"name": ablation.name, "changed_stages": ablation.stages, "group": ablation.group,
            "removed": ablation.removed, "reused_stages": reused,
            "started_from": str(init) if init else None, **summary,
            "test": {cond: r["test"] for cond, r in tested.items()}}


def run_ablations(config: CMACLIPConfig, data: Splits, conditions: dict[str, list[str | None]],
                  checkpoints: dict[str, dict[str, Path]], run_dir: Path, opts: Options,
                  timing: dict[str, float]) -> dict[str, Any]:
    """{"rows": one per ablation (none when the config turns no choice on), "groups": the choice groups},
    or {"not_run": why}."""
    if not opts.ablations:
        return {"not_run": "--no-ablations"}
    if VARIANT not in checkpoints:
        return {"not_run": f"{VARIANT} is not among the variants"}
    rows = []
    for ablation in ablations(config):
        with timed(timing, f"ablation/{ablation.name}"):
            rows.append(run_ablation(ablation, config, data, conditions, checkpoints[VARIANT], run_dir, opts))
    return {"rows": rows, "groups": list(TRAINING_CHOICES)}
