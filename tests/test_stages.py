"""Stage definitions (Algorithm 1): what each stage freezes, its learning rates, and that training a stage
leaves the frozen parts bit-identical while the trainable parts move."""
import random

import pytest
import torch

import cmaclip
from cmaclip.config import ALIGN
from cmaclip.stages import (STAGE_DEFS, apply_stage, frozen_forward, frozen_groups, frozen_prefix,
                            group_modules, learning_rates, padding_mask_from_eot, trainable_forward)
from cmaclip.train import train_stage
from cmaclip.transforms import padding_mask, tokenizer, trim_tokens
from tiny_training import TASKS, WORDS, one_thread, tiny_config, tiny_model  # noqa: F401


def batches(cfg, n=32, micro=16, seed=0):
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    titles = [" ".join(rnd.sample(WORDS, rnd.randint(1, 10))) for _ in range(n)]
    images, text = torch.randn(n, 3, 32, 32, generator=g), tokenizer(cfg)(titles)
    labels = {t: torch.randint(0, c, (n,), generator=g) for t, c in TASKS.items()}
    return [{"product_id": [f"p{seed}-{j}" for j in range(i, min(i + micro, n))],
             "images": images[i:i + micro], "text": trim_tokens(text[i:i + micro]),
             "labels": {t: y[i:i + micro] for t, y in labels.items()}} for i in range(0, n, micro)]


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_stage_definitions_follow_algorithm_1():
    cfg = cmaclip.load_config("paper-vit-b-32")
    assert frozen_groups("warmup", cfg) == {"clip"}
    assert frozen_groups("end_to_end", cfg) == set()
    assert frozen_groups("tuning", cfg) == {"clip", "sequence"}
    assert learning_rates("end_to_end", cfg) == {g: 1e-5 for g in ("clip", "sequence", "modality", "head")}
    assert frozen_groups(ALIGN, cfg) == {"sequence", "modality", "head"}     # catalog pre-training: CLIP only
    assert list(STAGE_DEFS) == [ALIGN, "warmup", "end_to_end", "tuning"]


def test_config_cannot_unfreeze_what_algorithm_1_freezes_but_lr_0_freezes_more():
    cfg = tiny_config()
    cfg.train.stages["warmup"].lr_clip = 1e-5
    with pytest.raises(ValueError, match="freezes"):
        frozen_groups("warmup", cfg)
    cfg = tiny_config()
    cfg.train.stages["end_to_end"].lr_head = 0.0
    assert frozen_groups("end_to_end", cfg) == {"head"}


@pytest.mark.parametrize("stage", [ALIGN, "warmup", "end_to_end", "tuning"])
def test_apply_stage_freezes_groups_and_builds_optimizer_groups(stage):
    cfg = tiny_config()
    model = tiny_model(cfg)
    param_groups = apply_stage(model, stage, cfg)
    frozen = frozen_groups(stage, cfg)
    lrs = learning_rates(stage, cfg)
    # align also trains CLIP's temperature, at CLIP's learning rate and without weight decay.
    scale = [{"name": "logit_scale", "lr": lrs["clip"], "weight_decay": 0.0}] if stage == ALIGN else []
    assert [g["name"] for g in param_groups] == [g for g in ("clip", "sequence", "modality", "head")
                                                 if g not in frozen] + [g["name"] for g in scale]
    assert all(g["lr"] == lrs[g["name"]] for g in param_groups if g["name"] != "logit_scale")
    assert [{k: g[k] for k in ("name", "lr", "weight_decay")} for g in param_groups if "weight_decay" in g] == scale
    in_optimizer = {id(p) for g in param_groups for p in g["params"]}
    for name, params in model.parameter_groups().items():
        assert all(p.requires_grad == (name not in frozen) for p in params), name
    # Only optimizer parameters require grad: logit_scale (unused outside align) and frozen groups do not.
    assert {id(p) for p in model.parameters() if p.requires_grad} == in_optimizer
    assert model.towers.clip.logit_scale.requires_grad == (stage == ALIGN)
    for name, modules in group_modules(model).items():
        for module in modules:
            assert all(m.training == (name not in frozen) for m in module.modules()), name


def test_frozen_prefix_and_split_forward_equal_the_full_forward():
    cfg = tiny_config()
    model = tiny_model(cfg).eval()
    batch = batches(cfg, n=8, micro=8)[0]
    with torch.no_grad():
        full = model(batch["images"], batch["text"]).logits
        for stage, prefix in [("end_to_end", "none"), ("warmup", "tokens"), ("tuning", "fused")]:
            assert frozen_prefix(model, frozen_groups(stage, cfg)) == prefix
            inputs = frozen_forward(model, prefix, batch["images"], batch["text"])
            split = trainable_forward(model, prefix, **inputs).logits
            assert all(torch.equal(full[t], split[t]) for t in TASKS), prefix
    eot = batch["text"].argmax(-1)
    assert torch.equal(padding_mask_from_eot(eot, batch["text"].shape[1]), padding_mask(batch["text"]))
    # Without sequence attention, warm-up's frozen part already ends at I' and T'.
    no_attention = tiny_model(cmaclip.with_variant(cfg, "no-attention"))
    assert frozen_prefix(no_attention, frozen_groups("warmup", cfg)) == "fused"


@pytest.mark.parametrize("stage, frozen", [("warmup", ("clip",)), ("tuning", ("clip", "sequence")),
                                           ("end_to_end", ()), (ALIGN, ("sequence", "modality", "head"))])
def test_training_a_stage_keeps_frozen_parts_bit_identical(tmp_path, stage, frozen):
    cfg = tiny_config(batch_size=16, micro_batch_size=16)
    cfg.cma.dropout = 0.1   # dropout on: frozen modules must still be in eval mode, not just lr 0
    cfg.train.stages[stage].epochs = 2
    model = tiny_model(cfg)
    before = {g: snapshot(ps) for g, ps in model.parameter_groups().items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    train_stage(model, stage, cfg, batches(cfg), batches(cfg, seed=1), tmp_path, resume=False)
    for group, params in model.parameter_groups().items():
        same = [torch.equal(a, b.detach()) for a, b in zip(before[group], params)]
        if group in frozen:
            assert all(same), f"{stage}: a frozen {group} parameter changed"
        else:
            assert not any(same), f"{stage}: some trainable {group} parameter did not change"
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
