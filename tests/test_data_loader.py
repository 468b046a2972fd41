from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cmaclip.config import load_config
from cmaclip.transforms import eot_index
from pipeline.training.data import (MISSING, EpochSampler, InMemorySplit, ProductStream, buffer_shuffle, collate,
                                    make_loader, set_epoch)
from pipeline.ingest.dataset import ingest, read_labels
from pipeline.synthetic import make_row

TASKS = "color,pattern,style"


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """500 products, every 10th without a color; small row groups so sharding has work to do."""
    root = tmp_path_factory.mktemp("loader")
    rows = [make_row(21, i) | ({"color": None} if i % 10 == 0 else {}) for i in range(500)]
    pq.write_table(pa.Table.from_pylist(rows), str(root / "catalog.parquet"))
    out = str(root / "out")
    return out, ingest(str(root / "catalog.parquet"), TASKS, out, row_group_rows=40, min_class_count=1)


def epoch_ids(loader) -> list[str]:
    return [pid for batch in loader for pid in batch["product_id"]]


def test_batch_format(data: tuple[str, dict], config) -> None:
    out, manifest = data
    loader = make_loader(out, "train", config, batch_size=16, shuffle=False)
    batch = next(iter(loader))
    assert set(batch) == {"product_id", "images", "text", "labels"}
    assert isinstance(batch["product_id"], list) and len(batch["product_id"]) == 16
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (16, 3, 32, 32)
    assert batch["text"].dtype == torch.long and batch["text"].shape[0] == 16
    assert batch["text"].shape[1] == int(eot_index(batch["text"]).max()) + 1 <= config.clip.context_length
    assert set(batch["labels"]) == {"color", "pattern", "style"}
    for task, ids in batch["labels"].items():
        assert ids.dtype == torch.long and ids.shape == (16,)
        assert int(ids.max()) < len(manifest["vocabularies"][task])
    assert -3 < float(batch["images"].min()) and float(batch["images"].max()) < 3  # normalised


def test_missing_labels_are_minus_one(data: tuple[str, dict], config) -> None:
    out, manifest = data
    loader = make_loader(out, "train", config, batch_size=64)
    colors = torch.cat([b["labels"]["color"] for b in loader])
    assert int((colors == MISSING).sum()) == pq.read_table(
        str(Path(out) / "dataset"), filters=[("split", "=", "train")]).column("color").null_count
    assert int((colors == MISSING).sum()) > 0


def test_unknown_label_is_minus_one(data: tuple[str, dict], config) -> None:
    out, _ = data
    vocab = {t: d["vocabulary"] for t, d in read_labels(out).items()}
    dropped = vocab["style"].pop(0)
    stored = pq.read_table(str(Path(out) / "dataset"), columns=["product_id", "style"]).to_pylist()
    style_of = {r["product_id"]: r["style"] for r in stored}
    samples = list(ProductStream(out, "train", config, vocab))
    for s in samples:
        expected = MISSING if style_of[s["product_id"]] == dropped else vocab["style"].index(style_of[s["product_id"]])
        assert s["labels"]["style"] == expected
    assert any(s["labels"]["style"] == MISSING for s in samples)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_per_epoch(data: tuple[str, dict], config, workers: int) -> None:
    out, manifest = data
    loader = make_loader(out, "train", config, batch_size=32, num_workers=workers, seed=3)
    ids = epoch_ids(loader)
    assert len(ids) == len(set(ids)) == manifest["counts"]["rows_by_split"]["train"]


def test_steps_per_epoch_is_exact(data: tuple[str, dict], config) -> None:
    out, _ = data
    loader = make_loader(out, "train", config, batch_size=32, num_workers=2)
    assert sum(1 for _ in loader) == loader.dataset.steps_per_epoch(32, 2)


def test_reshuffle_per_epoch_is_deterministic(data: tuple[str, dict], config) -> None:
    out, _ = data
    loader = make_loader(out, "train", config, batch_size=50, seed=7)
    first = epoch_ids(loader)
    set_epoch(loader, 1)
    second = epoch_ids(loader)
    set_epoch(loader, 0)
    again = epoch_ids(loader)
    assert first == again and first != second and sorted(first) == sorted(second)
    other_seed = epoch_ids(make_loader(out, "train", config, batch_size=50, seed=8))
    assert other_seed != first


def test_eval_splits_are_not_shuffled(data: tuple[str, dict], config) -> None:
    out, _ = data
    ids = epoch_ids(make_loader(out, "test", config, batch_size=8))
    stored = pq.read_table(str(Path(out) / "dataset"), filters=[("split", "=", "test")])
    assert sorted(ids) == sorted(stored.column("product_id").to_pylist())
    assert ids == epoch_ids(make_loader(out, "test", config, batch_size=8))


def test_shards_across_ranks_and_workers(data: tuple[str, dict], config, monkeypatch) -> None:
    """3 ranks x 2 workers, each slot iterated in-process (worker info faked) to keep the test fast;
    real DataLoader workers are covered by test_every_row_once_per_epoch[2]."""
    out, manifest = data
    total = manifest["counts"]["rows_by_split"]["train"]
    world, workers = 3, 2
    seen, steps = [], []
    for rank in range(world):
        stream = ProductStream(out, "train", config, shuffle=True, seed=1, rank=rank, world_size=world)
        ids = []
        for worker in range(workers):
            monkeypatch.setattr("pipeline.training.data.get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            ids += [s["product_id"] for s in stream]
        seen.append(ids)
        steps.append(stream.steps_per_epoch(16, workers))
    assert len({len(ids) for ids in seen}) == 1          # equal work per rank: no DDP hang
    assert len(set(steps)) == 1
    flat = [pid for ids in seen for pid in ids]
    assert len(flat) == len(set(flat))                   # disjoint
    assert total - len(flat) < world * workers            # at most slots - 1 rows left out


def test_in_memory_variant_matches_stream(data: tuple[str, dict], config) -> None:
    out, _ = data
    stream = {s["product_id"]: s["labels"] for s in ProductStream(out, "validation", config)}
    memory = InMemorySplit(out, "validation", config)
    assert len(memory) == len(stream)
    for i in range(len(memory)):
        sample = memory[i]
        assert stream[sample["product_id"]] == sample["labels"]
    loader = make_loader(out, "validation", config, batch_size=8, in_memory=True, shuffle=True)
    ids = epoch_ids(loader)
    set_epoch(loader, 1)
    assert sorted(ids) == sorted(stream) and ids != epoch_ids(loader)


def test_epoch_sampler_shards_equally() -> None:
    parts = [list(EpochSampler(10, True, seed=0, epoch=2, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 9


def test_buffer_shuffle_is_bounded_and_complete() -> None:
    outstanding = {"now": 0, "max": 0}

    def source() -> Iterator[dict]:
        for i in range(1000):
            outstanding["now"] += 1
            outstanding["max"] = max(outstanding["max"], outstanding["now"])
            yield {"i": i}

    out = []
    for row in buffer_shuffle(source(), 64, random.Random(0)):
        outstanding["now"] -= 1
        out.append(row["i"])
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert outstanding["max"] <= 65


def test_config_tasks_must_match_labels(data: tuple[str, dict], config) -> None:
    out, manifest = data
    n_colors = len(manifest["vocabularies"]["color"])
    ok = dataclasses.replace(config, tasks={"color": n_colors})
    batch = next(iter(make_loader(out, "validation", ok, batch_size=4)))
    assert set(batch["labels"]) == {"color"}
    with pytest.raises(ValueError, match="classes"):
        make_loader(out, "validation", dataclasses.replace(config, tasks={"color": n_colors + 1}))
    with pytest.raises(ValueError, match="not in the dataset"):
        make_loader(out, "validation", dataclasses.replace(config, tasks={"size": 3}))


def test_collate_trims_text() -> None:
    text = torch.zeros(2, 32, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    text[1, :5] = torch.tensor([49406, 320, 321, 322, 49407])
    samples = [{"product_id": str(i), "image": torch.zeros(3, 4, 4), "text": text[i], "labels": {"t": i}}
               for i in range(2)]
    batch = collate(samples)
    assert batch["text"].shape == (2, 5) and batch["labels"]["t"].tolist() == [0, 1]


def test_rank_comes_from_torch_distributed_when_initialized(data: tuple[str, dict], config, monkeypatch) -> None:
    out, _ = data
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 1)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 4)
    stream = ProductStream(out, "train", config)
    assert (stream.rank, stream.world_size) == (1, 4)
    explicit = ProductStream(out, "train", config, rank=0, world_size=1)
    assert (explicit.rank, explicit.world_size) == (0, 1)
