"""Data for the paper protocol: the catalog (optionally a deterministic subset), its ingest, and each
split held in memory with its decoded samples kept, since every variant reads the same split many times.

Built on `pipeline.training.data` (InMemorySplit, EpochSampler, collate): the samples are exactly the loader's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from cmaclip.config import CMACLIPConfig
from cmaclip.transforms import trim_tokens

from pipeline.training.data import EpochSampler, InMemorySplit, SampleMaker, collate


def subset_catalog(catalog: str, limit: int, out_path: Path) -> str:
    """The first `limit` rows in sha256(product_id) order, written to `out_path`. Hash order, not file
    order: the file is sorted by id, and ids follow catalogue time, so a prefix would skew the classes."""
    table = pq.read_table(catalog)
    keys = [hashlib.sha256(str(p).encode()).hexdigest() for p in table.column("product_id").to_pylist()]
    order = sorted(range(len(keys)), key=keys.__getitem__)[:limit]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(pa.array(order)), out_path)
    return str(out_path)


class MemoSamples(Dataset):
    """A split's samples, decoded on first use and kept (pixels as fp16: lossless next to the 8-bit
    source), so the five variants and their stages decode each image once instead of every epoch."""

    def __init__(self, split: InMemorySplit):
        self.split = split
        self.memo: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self.memo:
            sample = self.split[i]
            self.memo[i] = {**sample, "image": sample["image"].to(torch.float16)}
        sample = self.memo[i]
        return {**sample, "image": sample["image"].float()}


class StageSamples(Dataset):
    """One epoch of a training stage's samples: the stage's title corruption and image augmentation
    (pipeline.training.data.SampleMaker) over the memo. A changed title is tokenized again; an augmented image is
    decoded again, since its pixels change every epoch."""

    def __init__(self, memo: MemoSamples, maker: SampleMaker, epoch: int):
        self.memo, self.maker, self.epoch = memo, maker, epoch

    def __len__(self) -> int:
        return len(self.memo)

    def __getitem__(self, i: int) -> dict[str, Any]:
        split = self.memo.split
        if self.maker.inputs.augments_images:
            return self.maker(split.row(i), self.epoch, split.columns["title"], i)
        title = self.maker.title(split.row(i), self.epoch, split.columns["title"], i)
        return {**self.memo[i], "text": self.maker.text(title)}


@dataclass
class SplitData:
    """One split: its samples for the model, and its raw titles and label strings for the noise tests."""
    name: str
    samples: MemoSamples
    product_id: list[str]
    titles: list[str | None]
    labels: dict[str, list[str | None]]

    def __len__(self) -> int:
        return len(self.product_id)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> DataLoader:
        sampler = EpochSampler(len(self.samples), shuffle, seed, epoch)
        return DataLoader(self.samples, batch_size=batch_size, sampler=sampler, collate_fn=collate)

    def epochs(self, batch_size: int, seed: int, stage: str | None = None,
               config: CMACLIPConfig | None = None) -> Callable[[int], DataLoader]:
        """The trainer's loader factory: epoch -> that epoch's shuffled batches, with the input changes of
        the training `stage` (its title corruption and image augmentation, seeded by `seed`) if it has any.
        `config`: whose stage settings (an ablation's); by default the one the split was loaded with."""
        maker = self.samples.split.make.for_stage(stage, seed, config)
        if not maker.changes_inputs:
            return lambda epoch: self.batches(batch_size, shuffle=True, seed=seed, epoch=epoch)

        def for_epoch(epoch: int) -> DataLoader:
            data = StageSamples(self.samples, maker, epoch)
            return DataLoader(data, batch_size=batch_size, sampler=EpochSampler(len(data), True, seed, epoch),
                              collate_fn=collate)
        return for_epoch

    def product_labels(self) -> list[list[str | None]]:
        """Per product, its label of every task (None where missing)."""
        return [list(labels) for labels in zip(*self.labels.values())]


def load_split(dataset_uri: str, split: str, config: CMACLIPConfig, labels: dict[str, Any]) -> SplitData:
    raw = InMemorySplit(dataset_uri, split, config, labels)
    cols = raw.columns
    return SplitData(split, MemoSamples(raw), [str(p) for p in cols["product_id"]], list(cols["title"]),
                     {t: list(cols[t]) for t in config.tasks})


def retitled(batches: Iterable[dict], titles: dict[str, str | None],
             tokenize: Callable[[Sequence[str]], torch.Tensor]) -> Iterator[dict]:
    """The same batches with each product's title replaced by `titles[product_id]` (re-tokenized)."""
    for batch in batches:
        text = tokenize([titles[str(p)] or "" for p in batch["product_id"]])
        yield {**batch, "text": trim_tokens(text)}
