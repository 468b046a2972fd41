"""Shared scaffolding for the training tests: a tiny two-task config, random products, loader factories, and
CPU processes in one gloo group for the DDP tests."""
import dataclasses
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def padded_validation(cfg):
    """24 validation samples in 4 batches of 8, the first one twice: two ranks' shards padded to equal
    length, as a DistributedSampler pads them. Metrics over both must count 24, the padding dropped."""
    return [collate(samples(cfg, 24, 2), range(i, i + 8)) for i in (0, 8, 16, 0)]


# --- DDP: CPU processes over gloo, as torchrun would start them ----------------------------------------------

def run_ranks(worker, folder: Path, world: int = 2) -> list[dict]:
    """`worker(rank, world, folder) -> dict` on `world` spawned processes in one gloo group, one thread each;
    what each rank returned, in rank order."""
    mp.spawn(_rank, args=(worker, world, str(folder)), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def _rank(rank, worker, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world, folder), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
