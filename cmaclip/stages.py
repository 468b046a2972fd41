"""The three training stages of Algorithm 1 (paper section 4.2.2), and the optional catalog pre-training
before them: what each freezes, and the learning rate of each parameter group (clip = CLIP, sequence =
CMA_SA, modality = CMA_MA, head = MLP).

    align       (optional)   CLIP's towers and temperature train on its contrastive loss (cmaclip/align.py)
    warmup      lines 4-17   CLIP frozen; sequence attention, modality attention and heads train
    end_to_end  lines 18-22  everything trains
    tuning      lines 23-27  CLIP and sequence attention frozen; modality attention and heads train

A frozen group gets requires_grad=False, stays out of the optimizer and runs in eval mode (no dropout), so
its output is a fixed function of the input: that is what makes the frozen-feature caches exact.

Because the frozen groups are always a prefix of the forward pass (CLIP, then sequence attention), the
forward splits into a frozen part, run under no_grad, and a trainable part:

    prefix "none"    end_to_end: nothing frozen             trainable: model(images, text)
    prefix "tokens"  warmup: CLIP frozen                    trainable: fuse + classify from CLIP tokens
    prefix "fused"   tuning: CLIP and sequence attention    trainable: classify from I', T'
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ALIGN, ALL_STAGES, CMACLIPConfig
from .model import CMACLIP, CMACLIPOutput, Tokens

GROUPS = ("clip", "sequence", "modality", "head")


@dataclass(frozen=True)
class Stage:
    name: str
    frozen: frozenset[str]   # parameter groups Algorithm 1 freezes in this stage
    lines: str               # where Algorithm 1 describes it


STAGE_DEFS = {
    ALIGN: Stage(ALIGN, frozenset({"sequence", "modality", "head"}), "catalog pre-training, before Algorithm 1"),
    "warmup": Stage("warmup", frozenset({"clip"}), "lines 4-17"),
    "end_to_end": Stage("end_to_end", frozenset(), "lines 18-22"),
    "tuning": Stage("tuning", frozenset({"clip", "sequence"}), "lines 23-27"),
}
assert tuple(STAGE_DEFS) == ALL_STAGES


def learning_rates(stage: str, config: CMACLIPConfig) -> dict[str, float]:
    """Per-group learning rates of a stage, from the config (0 = frozen)."""
    if stage not in STAGE_DEFS:
        raise ValueError(f"unknown stage {stage!r}; stages are {ALL_STAGES}")
    s = config.train.stages[stage]
    return {"clip": s.lr_clip, "sequence": s.lr_sequence, "modality": s.lr_modality, "head": s.lr_head}


def frozen_groups(stage: str, config: CMACLIPConfig) -> frozenset[str]:
    """What the stage freezes by definition, plus any group the config gives a learning rate of 0."""
    lrs = learning_rates(stage, config)
    if any(lr < 0 for lr in lrs.values()):
        raise ValueError(f"negative learning rate in stage {stage}: {lrs}")
    contradicts = sorted(g for g in STAGE_DEFS[stage].frozen if lrs[g] > 0)
    if contradicts:
        raise ValueError(f"{stage} freezes {contradicts} ({STAGE_DEFS[stage].lines}), "
                         f"but the config gives them learning rates {[lrs[g] for g in contradicts]}; set 0")
    return STAGE_DEFS[stage].frozen | {g for g, lr in lrs.items() if lr == 0}


def group_modules(model: CMACLIP) -> dict[str, list[nn.Module]]:
    """The modules holding each parameter group, so a frozen group can be put in eval mode."""
    return {
        "clip": [model.towers],
        "sequence": [model.sequence_attention] if model.sequence_attention is not None else [],
        "modality": [model.modality_attention],
        "head": [model.heads],
    }


def set_train_mode(model: CMACLIP, frozen: frozenset[str]) -> None:
    """Train mode for the groups that train, eval mode for the frozen ones (dropout off, outputs exact)."""
    model.train()
    modules = group_modules(model)
    for group in frozen:
        for module in modules[group]:
            module.eval()


def apply_stage(model: CMACLIP, stage: str, config: CMACLIPConfig) -> list[dict]:
    """Freeze what the stage freezes and return the optimizer's parameter groups (trainable ones only).

    Every parameter outside the four groups (CLIP's logit_scale, which CMA-CLIP never uses) is frozen too:
    it would get no gradient, and DDP refuses parameters that require grad but get none. Except in align,
    whose contrastive loss learns it: there it trains at lr_clip without weight decay, as in CLIP."""
    frozen, lrs = frozen_groups(stage, config), learning_rates(stage, config)
    for p in model.parameters():
        p.requires_grad_(False)
    param_groups = []
    for name, params in model.parameter_groups().items():
        if name in frozen or not params:
            continue
        for p in params:
            p.requires_grad_(True)
        param_groups.append({"name": name, "params": params, "lr": lrs[name]})
    if not param_groups:
        raise ValueError(f"stage {stage} trains nothing: every group is frozen")
    if stage == ALIGN:
        scale = model.towers.clip.logit_scale.requires_grad_(True)
        param_groups.append({"name": "logit_scale", "params": [scale], "lr": lrs["clip"], "weight_decay": 0.0})
    set_train_mode(model, frozen)
    return param_groups


# ---------------------------------------------------------------------------------------------------------
# The forward pass split at the frozen prefix.

def frozen_prefix(model: CMACLIP, frozen: frozenset[str]) -> str:
    """How much of the forward pass is frozen: "none", "tokens" (CLIP) or "fused" (CLIP + sequence attn)."""
    if "clip" not in frozen:
        return "none"
    if "sequence" in frozen or model.sequence_attention is None:
        return "fused"
    return "tokens"


def _present(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if v is not None}


def frozen_forward(model: CMACLIP, prefix: str, images: torch.Tensor, text: torch.Tensor) -> dict:
    """The frozen part of the forward pass; its output is the trainable part's input. Call it under
    no_grad. Absent modalities (single-modality variants) are left out of the dict."""
    if prefix == "none":
        return {"images": images, "text": text}
    tokens = model.encode_tokens(images, text)
    if prefix == "tokens":
        return _present(image=tokens.image, text=tokens.text, eot=tokens.eot)
    image, text_feature = model.fuse(tokens)
    return _present(image=image, text=text_feature)


def trainable_forward(model: CMACLIP, prefix: str, image=None, text=None, eot=None,
                      images=None, per_modality: bool = False) -> CMACLIPOutput:
    """The trainable part of the forward pass, from `frozen_forward`'s output (or the raw batch)."""
    if prefix == "none":
        return model.classify(*model.fuse(model.encode_tokens(images, text)), per_modality)
    if prefix == "tokens":
        padding = padding_mask_from_eot(eot, text.shape[1]) if text is not None else None
        return model.classify(*model.fuse(Tokens(image, text, padding, eot)), per_modality)
    return model.classify(image, text, per_modality)


def padding_mask_from_eot(eot: torch.Tensor, length: int) -> torch.Tensor:
    """True past each sample's end-of-text token: `transforms.padding_mask` rebuilt without the token ids
    (the warm-up cache keeps CLIP tokens, not ids)."""
    positions = torch.arange(length, device=eot.device)
    return positions[None, :] > eot[:, None]

