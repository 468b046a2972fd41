"""Shared scaffolding for the training tests: a tiny two-task config, random products, loader factories."""
import dataclasses
import random

import pytest
import torch

import cmaclip
from cmaclip.transforms import tokenizer, trim_tokens

TASKS = {"color": 3, "pattern": 2}
WORDS = "red green blue plain striped dotted cotton shirt dress long sleeve slim fit jeans for men women".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread and lose ~20x when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**train) -> cmaclip.CMACLIPConfig:
    cfg = cmaclip.load_config("tiny").with_tasks(TASKS)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{"precision": "fp32", **train}))


def tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    return cmaclip.create_model(cfg, load_pretrained=False)


def samples(cfg, n, seed):
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    titles = [" ".join(rnd.sample(WORDS, rnd.randint(1, 10))) for _ in range(n)]
    return {"ids": [f"p{seed}-{i}" for i in range(n)], "images": torch.randn(n, 3, 32, 32, generator=g),
            "text": tokenizer(cfg)(titles),
            "labels": {t: torch.randint(0, c, (n,), generator=g) for t, c in TASKS.items()}}


def collate(data, rows):
    rows = torch.as_tensor(rows)
    return {"product_id": [data["ids"][i] for i in rows], "images": data["images"][rows],
            "text": trim_tokens(data["text"][rows]), "labels": {t: y[rows] for t, y in data["labels"].items()}}


def loader(data, micro, shuffle=False):
    """A loader factory: epoch -> batches. Shuffles with the global torch RNG, as DataLoader(shuffle=True)
    does, so a resumed run must restore that RNG to see the same order."""
    n = len(data["ids"])

    def batches(epoch):
        order = torch.randperm(n) if shuffle else torch.arange(n)
        return [collate(data, order[i:i + micro]) for i in range(0, n, micro)]
    return batches
