"""The CLIP baselines: contrastive fine-tuning learns the pairs, zero-shot scores every class of every task."""
import numpy as np
import pytest
import torch

from cmaclip.clip_baseline import class_embeddings, finetune_contrastive, templates_for, zero_shot_predict
from cmaclip.config import load_config
from cmaclip.encoders import CLIPTowers
from cmaclip.pretrained import create_clip
from cmaclip.transforms import tokenizer, trim_tokens

TITLES = ["red shirt", "blue jeans", "black shoes", "white cap", "green bag", "pink top", "grey socks", "gold watch"]
CLASSES = {"color": ["red", "blue", "black", "white", "green", "pink", "grey", "gold"], "kind": ["wear", "accessory"]}


@pytest.fixture
def setup():
    config = load_config("tiny")
    torch.manual_seed(0)
    towers = CLIPTowers(create_clip(config.clip))
    tokenize = tokenizer(config)
    batch = {"product_id": [str(i) for i in range(len(TITLES))], "images": torch.randn(len(TITLES), 3, 32, 32),
             "text": trim_tokens(tokenize(TITLES)),
             "labels": {"color": torch.arange(len(TITLES)), "kind": torch.tensor([0, 0, 0, 1, 1, 0, 0, 1])}}
    return towers, tokenize, batch


def test_contrastive_finetuning_learns_the_pairs(setup):
    towers, _, batch = setup
    losses = finetune_contrastive(towers, lambda epoch: [batch], epochs=15, lr=3e-3, log=lambda _: None)
    assert losses[-1] < 0.5 * losses[0]


def test_zero_shot_scores_every_class_of_every_task(setup):
    towers, tokenize, batch = setup
    preds = zero_shot_predict(towers, [batch, batch], CLASSES, tokenize)
    assert len(preds) == 2 * len(TITLES)
    for task, names in CLASSES.items():
        assert preds.probs[task].shape == (2 * len(TITLES), len(names))
        np.testing.assert_allclose(preds.probs[task].sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(preds.labels[task][: len(TITLES)], batch["labels"][task].numpy())
    assert preds.image_weight == {}  # zero-shot has no modality weight


def test_class_embeddings_are_unit_vectors(setup):
    towers, tokenize, _ = setup
    emb = class_embeddings(towers, tokenize, CLASSES["color"], templates_for("color"))
    assert emb.shape[0] == len(CLASSES["color"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(CLASSES["color"])))


def test_every_task_has_a_prompt_with_the_label():
    for task in ("color", "article_type", "usage", "pattern"):
        assert all("{}" in t for t in templates_for(task))
