"""Torch datasets over an ingested dataset split, and the collate that builds the model's batch.

`ProductStream` streams Parquet row groups and is memory bounded: a worker holds one row group and a
shuffle buffer of raw rows; images are decoded and preprocessed in the DataLoader workers, after the
buffer. Sharding is by rows, not files: each epoch the row groups are put in a (seed, epoch) order and
cut into one contiguous range per (rank, worker) slot, so any number of workers and ranks splits the
data exactly. Under DDP every slot gets the same number of rows (at most `slots - 1` rows per epoch are
left out, different ones each epoch), so no rank waits for another at the end of an epoch.

`InMemorySplit` holds the raw rows of a split in memory (small data; faster epochs), same samples.

A training loader (`make_loader(..., stage=...)`) gives its samples that stage's title corruption and image
augmentation (`SampleMaker`; the config's StageConfig fields); validation and scoring loaders give none.

Batch (see `collate`):
    {"product_id": list[str], "images": FloatTensor[B, 3, H, W],
     "text": LongTensor[B, L] trimmed to the longest title, "labels": {task: LongTensor[B], -1 = missing}}
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from cmaclip.config import CMACLIPConfig, StageConfig
from cmaclip.corruption import corrupt_title, sample_rng
from cmaclip.transforms import augment_image, image_size, image_transform, tokenizer, trim_tokens

from ..ingest.dataset import dataset_files, read_labels
from ..io import storage
from ..io.images import DEFAULT_LIMITS, ImageLimits, decode_image

MISSING = -1  # label id where the label is null or not in the vocabulary: masks that task's loss
IN_MEMORY_MAX_ROWS = 20_000   # splits up to this size are held in memory as raw rows (faster epochs)


@dataclass(frozen=True)
class RowGroup:
    uri: str
    index: int
    rows: int


def row_groups(dataset_uri: str, split: str) -> list[RowGroup]:
    """Every row group of a split, from the manifest's file list and the files' footers."""
    groups = []
    for part in dataset_files(dataset_uri, split):
        meta = storage.parquet_file(part["uri"]).metadata
        groups += [RowGroup(part["uri"], i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return groups


def as_vocabularies(labels: dict[str, Any]) -> dict[str, list[str]]:
    """Accept labels.json ({task: {"vocabulary": [...]}}) or plain {task: [labels]}."""
    return {t: list(v["vocabulary"] if isinstance(v, dict) else v) for t, v in labels.items()}


def select_tasks(vocab: dict[str, list[str]], config: CMACLIPConfig) -> dict[str, list[str]]:
    """The config's tasks (all of the dataset's when it names none); class counts must agree."""
    if not config.tasks:
        return vocab
    missing = set(config.tasks) - set(vocab)
    if missing:
        raise ValueError(f"config tasks {sorted(missing)} are not in the dataset's labels {sorted(vocab)}")
    for task, n in config.tasks.items():
        if len(vocab[task]) != n:
            raise ValueError(f"task {task!r}: config says {n} classes, labels.json has {len(vocab[task])}")
    return {t: vocab[t] for t in config.tasks}


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed's when initialized; else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleMaker:
    """Raw row -> model sample (decoded, preprocessed image; tokens; label ids). Built lazily in each
    worker: the tokenizer and transform are not worth pickling.

    With a training `stage`, the sample gets that stage's title corruption (cmaclip/corruption.py) and image
    augmentation (transforms.augment_image), drawn from generators seeded by (seed, stage, epoch, product
    id): the same in any worker or rank. A stage that changes nothing makes exactly the plain sample."""

    def __init__(self, config: CMACLIPConfig, vocab: dict[str, list[str]], limits: ImageLimits,
                 stage: str | None = None, seed: int = 0):
        self.config, self.vocab = config, vocab
        self.tasks = tuple(vocab)
        self.ids = {t: {label: i for i, label in enumerate(labels)} for t, labels in vocab.items()}
        self.limits = limits
        self.size = image_size(config)
        self.stage, self.seed = stage, seed
        self.inputs = config.train.stages[stage] if stage is not None else StageConfig()
        unknown = set(self.inputs.label_word_tasks) - set(self.tasks)
        if unknown:
            raise ValueError(f"label_word_tasks {sorted(unknown)} of stage {stage} are not tasks {self.tasks}")
        crop = self.inputs.crop_scale
        self.draft = math.ceil(self.size / math.sqrt(crop[0])) if crop else self.size  # crops zoom in
        self._transform: Callable | None = None
        self._tokenize: Callable | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None, "_tokenize": None}

    def for_stage(self, stage: str | None, seed: int, config: CMACLIPConfig | None = None) -> "SampleMaker":
        """The same maker with another stage's input changes (of `config`, by default this maker's)."""
        return SampleMaker(config or self.config, self.vocab, self.limits, stage, seed)

    @property
    def changes_inputs(self) -> bool:
        return self.inputs.corrupts_titles or self.inputs.augments_images

    def _build(self) -> None:
        self._tokenize = tokenizer(self.config)
        self._transform = (augment_image(self.config, self.inputs) if self.inputs.augments_images
                           else image_transform(self.config))

    def title(self, row: dict[str, Any], epoch: int = 0, pool: Sequence[str | None] = (), position: int = 0) -> str:
        """The row's title as this stage trains on it; `pool[position]` is the row's own title, the rest
        are what a swap may take."""
        if not self.inputs.corrupts_titles:
            return row["title"] or ""
        rng = sample_rng(self.seed, self.stage, epoch, row["product_id"], "title")
        return corrupt_title(row["title"], {t: row[t] for t in self.tasks}, self.inputs, rng, pool, position)

    def image(self, row: dict[str, Any], epoch: int = 0) -> torch.Tensor:
        if self._transform is None:
            self._build()
        decoded = decode_image(row["image"], self.limits, draft=(self.draft, self.draft))
        if not decoded.ok:  # ingest validated every image: this is corruption, not dirty data
            raise ValueError(f"dataset image of product {row['product_id']!r}: {decoded.reason} ({decoded.detail})")
        if not self.inputs.augments_images:
            return self._transform(decoded.image)
        return self._transform(decoded.image, sample_rng(self.seed, self.stage, epoch, row["product_id"], "image"))

    def text(self, title: str) -> torch.Tensor:
        if self._tokenize is None:
            self._build()
        return self._tokenize([title])[0]

    def __call__(self, row: dict[str, Any], epoch: int = 0, pool: Sequence[str | None] = (),
                 position: int = 0) -> dict[str, Any]:
        return {"product_id": row["product_id"],
                "image": self.image(row, epoch),
                "text": self.text(self.title(row, epoch, pool, position)),
                "labels": {t: self.ids[t].get(row[t], MISSING) if row[t] is not None else MISSING
                           for t in self.tasks}}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> the batch the model and the trainer use; text trimmed to the batch's longest title."""
    tasks = samples[0]["labels"].keys() if samples else ()
    return {
        "product_id": [s["product_id"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "text": trim_tokens(torch.stack([s["text"] for s in samples])),
        "labels": {t: torch.tensor([s["labels"][t] for s in samples], dtype=torch.long) for t in tasks},
    }


def _epoch_rng(seed: int, epoch: int, slot: int = -1) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{slot}")


def slot_range(slot: int, slots: int, total: int, equal: bool) -> tuple[int, int]:
    """Rows [start, stop) of the epoch's row sequence for one slot; `equal` drops the remainder."""
    if equal:
        per = total // slots
        return slot * per, (slot + 1) * per
    return slot * total // slots, (slot + 1) * total // slots


def buffer_shuffle(rows: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a bounded buffer: each incoming row replaces a random buffered one."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        buffer[i], row = row, buffer[i]
        yield row
    rng.shuffle(buffer)
    yield from buffer


class ProductStream(IterableDataset):
    """Streams one split of an ingested dataset (see module doc). Call `set_epoch(e)` before each epoch
    (the DataLoader copies the dataset into its workers when an iterator starts). With a training `stage`,
    a swapped title comes from another product of the same row group."""

    def __init__(self, dataset_uri: str, split: str, config: CMACLIPConfig,
                 labels: dict[str, Any] | None = None, *, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, buffer_size: int = 1024, rank: int | None = None,
                 world_size: int | None = None, limits: ImageLimits = DEFAULT_LIMITS, stage: str | None = None):
        vocab = select_tasks(as_vocabularies(labels or read_labels(dataset_uri)), config)
        self.groups = row_groups(dataset_uri, split)
        self.columns = ["product_id", "title", "image", *vocab]
        self.make = SampleMaker(config, vocab, limits, stage, seed)
        self.shuffle, self.seed, self.epoch, self.buffer_size = shuffle, seed, epoch, buffer_size
        # Resolved here, in the main process: a spawned DataLoader worker has no process group.
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self._files: dict[str, pq.ParquetFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def total_rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def slots(self, num_workers: int = 1) -> tuple[list[int], int]:
        """This rank's slot ids and the slot count, for `num_workers` DataLoader workers."""
        workers = max(1, num_workers)
        return [self.rank * workers + w for w in range(workers)], self.world_size * workers

    def slot_sizes(self, num_workers: int = 1) -> list[int]:
        """Rows each of this rank's workers yields per epoch (exact; the same for every epoch)."""
        mine, total_slots = self.slots(num_workers)
        return [b - a for a, b in (slot_range(s, total_slots, self.total_rows, self.world_size > 1) for s in mine)]

    def steps_per_epoch(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """Batches this rank yields per epoch: each worker batches its own rows."""
        sizes = self.slot_sizes(num_workers)
        return sum(n // batch_size if drop_last else -(-n // batch_size) for n in sizes)

    def _order(self) -> list[RowGroup]:
        groups = list(self.groups)
        if self.shuffle:
            _epoch_rng(self.seed, self.epoch).shuffle(groups)
        return groups

    def _read(self, group: RowGroup) -> dict[str, list[Any]]:
        if group.uri not in self._files:
            self._files = {group.uri: storage.parquet_file(group.uri)}  # one open file per worker
        table = self._files[group.uri].read_row_group(group.index, columns=self.columns)
        return {name: table.column(name).to_pylist() for name in self.columns}

    def _rows(self, start: int, stop: int) -> Iterator[tuple[dict[str, Any], list[str | None], int]]:
        """(row, its row group's titles, its position there): the titles are the swap pool."""
        offset = 0
        for group in self._order():
            lo, hi = max(start, offset), min(stop, offset + group.rows)
            if lo < hi:
                cols = self._read(group)
                for i in range(lo - offset, hi - offset):
                    yield {name: values[i] for name, values in cols.items()}, cols["title"], i
            offset += group.rows
            if offset >= stop:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine, total_slots = self.slots(workers)
        start, stop = slot_range(mine[worker], total_slots, self.total_rows, self.world_size > 1)
        rows = self._rows(start, stop)
        if self.shuffle:
            rows = buffer_shuffle(rows, self.buffer_size, _epoch_rng(self.seed, self.epoch, mine[worker]))
        for row, pool, position in rows:
            yield self.make(row, self.epoch, pool, position)


class InMemorySplit(Dataset):
    """The raw rows of a split held in memory (image bytes, not pixels); decoding stays per sample. With a
    training `stage`, call `set_epoch(e)` before each epoch; a swapped title comes from the whole split."""

    def __init__(self, dataset_uri: str, split: str, config: CMACLIPConfig,
                 labels: dict[str, Any] | None = None, limits: ImageLimits = DEFAULT_LIMITS, *,
                 stage: str | None = None, seed: int = 0, epoch: int = 0):
        vocab = select_tasks(as_vocabularies(labels or read_labels(dataset_uri)), config)
        columns = ["product_id", "title", "image", *vocab]
        parts = [storage.parquet_file(p["uri"]).read(columns=columns) for p in dataset_files(dataset_uri, split)]
        self.columns = {c: [v for t in parts for v in t.column(c).to_pylist()] for c in columns}
        self.make = SampleMaker(config, vocab, limits, stage, seed)
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.columns["product_id"])

    def row(self, i: int) -> dict[str, Any]:
        return {name: values[i] for name, values in self.columns.items()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.make(self.row(i), self.epoch, self.columns["title"], i)


class EpochSampler(Sampler[int]):
    """A (seed, epoch) permutation sharded across DDP ranks, equal length per rank (remainder dropped).

    Not torch's DistributedSampler: its permutation (torch.randperm seeded with seed + epoch) is another
    order than `_epoch_rng`'s, which ProductStream shares, so the in-memory and streamed loaders and the
    recorded paper results would no longer see the same samples per epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch
        self.rank, self.world = dist_rank_world(rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world if self.world > 1 else self.n

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        if self.shuffle:
            _epoch_rng(self.seed, self.epoch).shuffle(order)
        return iter(order[self.rank::self.world][: len(self)])


def make_loader(dataset_uri: str, split: str, config: CMACLIPConfig, labels: dict[str, Any] | None = None,
                batch_size: int = 32, shuffle: bool | None = None, num_workers: int = 0, seed: int = 0,
                epoch: int = 0, *, rank: int | None = None, world_size: int | None = None,
                in_memory: bool = False, buffer_size: int = 1024, drop_last: bool = False,
                pin_memory: bool = False, prefetch_factor: int | None = None, stage: str | None = None) -> DataLoader:
    """A DataLoader of model batches over one split. `shuffle` defaults to True for train only.
    Call `set_epoch(loader, e)` before each epoch to reshuffle (and redraw the stage's input changes).
    `stage`: the training stage whose title corruption and image augmentation the samples get, seeded by
    `seed` (None: the products as they are, for validation and scoring)."""
    shuffle = split == "train" if shuffle is None else shuffle
    extra = {"prefetch_factor": prefetch_factor} if num_workers and prefetch_factor else {}
    if in_memory:
        data = InMemorySplit(dataset_uri, split, config, labels, stage=stage, seed=seed, epoch=epoch)
        sampler = EpochSampler(len(data), shuffle, seed, epoch, rank, world_size)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory, **extra)
    stream = ProductStream(dataset_uri, split, config, labels, shuffle=shuffle, seed=seed, epoch=epoch,
                           buffer_size=buffer_size, rank=rank, world_size=world_size, stage=stage)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last, pin_memory=pin_memory, **extra)


def split_batches(dataset_uri: str, split: str, config: CMACLIPConfig, batch_size: int,
                  shuffle: bool = False, workers: int = 0, rank: int | None = None,
                  world_size: int | None = None, stage: str | None = None):
    """A DataLoader over one split of an ingested dataset; held in memory when the split is small.
    Under DDP each rank gets its shard; rank=0, world_size=1 asks for the whole split. `stage`: the
    training stage whose title corruption and image augmentation the samples get (None: none)."""
    rows = sum(f["rows"] for f in dataset_files(dataset_uri, split))
    return make_loader(dataset_uri, split, config, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                       seed=config.train.seed, in_memory=rows <= IN_MEMORY_MAX_ROWS, rank=rank,
                       world_size=world_size, stage=stage)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a loader from `make_loader` for `epoch` (works for both variants)."""
    for owner in (loader.dataset, loader.sampler):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
