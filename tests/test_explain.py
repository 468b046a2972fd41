"""What each modality contributes to a prediction (cmaclip/explain.py), and the auxiliary per-modality loss
that trains each modality to name the label alone (CMACLIP.classify(per_modality=True), losses.modality_loss,
StageConfig.modality_loss)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import cmaclip
from cmaclip.config import CMACLIPConfig, with_variant
from cmaclip.explain import MODALITIES, empty_titles, modality_contributions
from cmaclip.losses import IGNORE, modality_loss
from cmaclip.train import Callback, train_stage
from cmaclip.transforms import eot_index, tokenizer, trim_tokens
from tiny_training import TASKS, collate, loader, one_thread, samples, tiny_config, tiny_model  # noqa: F401

TITLES = ["red striped summer dress", "blue", "", "a very long title " * 3 + "with many words"]


@pytest.fixture(scope="module")
def config():
    return cmaclip.load_config("tiny").with_tasks(TASKS)


@pytest.fixture(scope="module")
def batch(config):
    torch.manual_seed(1)
    return torch.randn(len(TITLES), 3, 32, 32), trim_tokens(tokenizer(config)(TITLES))


def eval_model(config, variant=None, seed=0):
    torch.manual_seed(seed)
    return cmaclip.create_model(with_variant(config, variant) if variant else config, load_pretrained=False).eval()


# --- the withheld inputs -----------------------------------------------------------------------------------

def test_empty_titles_are_start_end_and_padding(config, batch):
    _, text = batch
    empty = empty_titles(text)
    start, end = tokenizer(config)([""])[0, :2].tolist()
    assert empty.shape == text.shape and empty.dtype == text.dtype
    assert (empty[:, 0] == start).all() and (empty[:, 1] == end).all() and (empty[:, 2:] == 0).all()
    assert (eot_index(empty) == 1).all()
    # What the tokenizer makes of an empty title, cut to the batch's length: "no title" is the null title.
    assert torch.equal(empty, tokenizer(config)([""] * len(TITLES))[:, :text.shape[1]])


# --- contributions -----------------------------------------------------------------------------------------

def test_a_modality_the_model_does_not_read_contributes_nothing(config, batch):
    for variant, silent, other in (("image-only", "title", "image"), ("text-only", "image", "title")):
        out = modality_contributions(eval_model(config, variant), *batch)
        for task in TASKS:
            assert (out[task][silent] == 0).all()
            assert (out[task][other] != 0).any()  # the one it reads does move the prediction


def test_a_contribution_is_the_confidence_lost_without_the_modality(config, batch):
    """confidence - contribution = p(ŷ) from the model run directly on the input without the modality: the
    empty title as the tokenizer makes it, and an all-zero (mean colour) image."""
    model, (images, text) = eval_model(config), batch
    out = modality_contributions(model, images, text)
    with torch.no_grad():
        full = model(images, text).logits
        without = {"title": model(images, tokenizer(config)([""] * len(TITLES))).logits,
                   "image": model(torch.zeros_like(images), text).logits}
    for task in TASKS:
        confidence, prediction = full[task].softmax(-1).max(-1)
        assert torch.equal(out[task]["prediction"], prediction)
        torch.testing.assert_close(out[task]["confidence"], confidence)
        for modality in MODALITIES:
            p = without[modality][task].softmax(-1).gather(1, prediction[:, None])[:, 0]
            torch.testing.assert_close(out[task]["confidence"] - out[task][modality], p, atol=1e-5, rtol=1e-5)
            assert (out[task][modality].abs() <= 1).all()


def test_contributions_are_deterministic(config, batch):
    first = modality_contributions(eval_model(config), *batch)
    again = modality_contributions(eval_model(config), *batch)
    for task in TASKS:
        assert first[task].keys() == again[task].keys() == {"prediction", "confidence", *MODALITIES}
        assert all(torch.equal(first[task][k], again[task][k]) for k in first[task])


# --- each modality classified alone ------------------------------------------------------------------------

def test_per_modality_logits_are_each_tasks_head_on_each_global_embedding(config, batch):
    model, (images, text) = eval_model(config), batch
    with torch.no_grad():
        image, fused_text = model.fuse(model.encode_tokens(images, text))
        plain = model.classify(image, fused_text)
        out = model.classify(image, fused_text, per_modality=True)
        assert plain.modality_logits is None
        for task in TASKS:
            assert torch.equal(out.logits[task], plain.logits[task])  # asking for them changes nothing else
            assert out.modality_logits[task].keys() == {"image", "text"}
            assert torch.equal(out.modality_logits[task]["image"], model.heads[task](image))
            assert torch.equal(out.modality_logits[task]["text"], model.heads[task](fused_text))
        image_only = eval_model(config, "image-only")
        alone = image_only.classify(*image_only.fuse(image_only.encode_tokens(images, text)), per_modality=True)
        assert all(alone.modality_logits[task].keys() == {"image"} for task in TASKS)


def test_modality_loss_is_the_masked_task_loss_averaged_over_modalities():
    torch.manual_seed(0)
    alone = {t: {m: torch.randn(6, n) for m in ("image", "text")} for t, n in TASKS.items()}
    labels = {"color": torch.tensor([0, 1, IGNORE, 2, IGNORE, 1]), "pattern": torch.full((6,), IGNORE)}
    kept = labels["color"] != IGNORE
    per_modality = {m: F.cross_entropy(alone["color"][m][kept], labels["color"][kept]) for m in ("image", "text")}
    torch.testing.assert_close(modality_loss(alone, labels), (per_modality["image"] + per_modality["text"]) / 2)
    only_image = {t: {"image": alone[t]["image"]} for t in TASKS}
    torch.testing.assert_close(modality_loss(only_image, labels), per_modality["image"])


# --- training with the per-modality loss -------------------------------------------------------------------

class Steps(Callback):
    def __init__(self):
        self.metrics = []

    def on_step(self, stage, step, metrics):
        self.metrics.append(metrics)


def with_modality_loss(cfg: CMACLIPConfig, weight: float | None) -> CMACLIPConfig:
    """The config as JSON, with every stage's modality_loss at `weight`, or without the field (None)."""
    d = cfg.to_dict()
    for stage in d["train"]["stages"].values():
        stage.pop("modality_loss")
        if weight is not None:
            stage["modality_loss"] = weight
    return CMACLIPConfig.from_dict(d)


def train(cfg: CMACLIPConfig, root, variant=None):
    """One end_to_end epoch (every module trains; dropout on, so the RNG streams matter too). Returns the
    weights, the step metrics and whether the trainer asked any head for per-modality logits."""
    cfg = with_variant(cfg, variant) if variant else cfg
    model, steps, asked = tiny_model(cfg), Steps(), []
    classify = model.classify
    model.classify = lambda image, text, per_modality=False: asked.append(per_modality) or classify(
        image, text, per_modality)
    train_stage(model, "end_to_end", cfg, loader(samples(cfg, 32, 1), 16), [collate(samples(cfg, 16, 2), range(16))],
                root, callbacks=[steps], resume=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, steps.metrics, any(asked)


@pytest.fixture(scope="module")
def base_config():
    cfg = tiny_config(batch_size=16, micro_batch_size=16, patience=0)
    cfg = dataclasses.replace(cfg, cma=dataclasses.replace(cfg.cma, dropout=0.1))
    cfg.train.stages["end_to_end"].epochs = 1
    return cfg


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_modality_loss_trains_exactly_as_a_config_without_it(base_config, tmp_path):
    before, before_steps, before_asked = train(with_modality_loss(base_config, None), tmp_path / "before")
    zero, zero_steps, zero_asked = train(with_modality_loss(base_config, 0.0), tmp_path / "zero")
    assert same_weights(before, zero) and not before_asked and not zero_asked
    assert [m["loss"] for m in before_steps] == [m["loss"] for m in zero_steps]
    assert not any("loss/modality" in m for m in zero_steps)


def test_modality_loss_changes_the_weights_and_is_logged_per_step(base_config, tmp_path):
    plain, _, _ = train(with_modality_loss(base_config, 0.0), tmp_path / "plain")
    weighted, steps, asked = train(with_modality_loss(base_config, 0.5), tmp_path / "weighted")
    assert asked and not same_weights(plain, weighted)
    assert steps and all("loss/modality" in m and m["loss/modality"] > 0 for m in steps)
    for m in steps:  # the step loss is the task losses plus the weighted per-modality loss
        assert math.isclose(m["loss"], sum(m[f"loss/{t}"] for t in TASKS) + 0.5 * m["loss/modality"], rel_tol=1e-5)


def test_a_one_modality_model_ignores_the_modality_loss(base_config, tmp_path):
    """I' alone is c for an image-only model: the loss would only repeat the task loss."""
    zero, _, _ = train(with_modality_loss(base_config, 0.0), tmp_path / "zero", "image-only")
    weighted, steps, asked = train(with_modality_loss(base_config, 0.5), tmp_path / "weighted", "image-only")
    assert same_weights(zero, weighted) and not asked and not any("loss/modality" in m for m in steps)
