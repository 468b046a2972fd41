"""Frozen-feature caches: compute once what a stage never changes, reuse it in later epochs.

In warm-up CLIP is frozen, so each product's CLIP token sequences are a fixed function of its image and
title; in tuning CLIP and the sequence attention are frozen, so each product's I' and T' are. The cache
keys those per-sample features by product id and a digest of the title's tokens:

    warm-up ("tokens")  image [1 + patches, D], text [eot + 1, D] (padding dropped), eot []
    tuning  ("fused")   image [D], text [D]

The title is in the key because a stage may corrupt titles (cmaclip/corruption.py): a product whose title
was dropped, stripped of its label words or swapped this epoch is another input, so it gets its own entry
and never the features of its original title. A dropped or stripped title is the same every time it
recurs, so those variants are reused like the original; a swap is mostly new. Images are not hashed (a
pixel digest costs a good part of what the cache saves): a stage that augments images changes every
image every epoch, so train_stage does not cache it at all.

A batch is rebuilt by stacking its samples (text zero-padded to the batch's longest title: the padding is
masked as attention keys and its own outputs are never read, so its values do not matter).

Same result as no cache: the frozen modules run in eval mode under no_grad, so a cached feature is what the
model would compute again, with two honest caveats, both checked by tests/test_cache.py:
  * storage dtype. "half" (default) stores 16-bit: bf16 features (bf16 autocast) are kept as they are,
    losslessly; fp32 features are rounded to fp16 (relative error <= 2**-11). "fp32" stores them exactly.
    A feature is used exactly as stored, also on the batch that first computed it, so a run's result does
    not depend on which samples hit the cache (budget, restarts): only on the storage dtype.
  * batch composition. Image tokens do not depend on the other samples of a batch; text tokens move by
    ~1e-6 (fp32) when the batch's trimmed title length changes, since attention then sums over a different
    key length. With the same batches every epoch an fp32 cache is bit-exact; with reshuffled batches it
    agrees within that rounding.

Bounded: memory first, then (kind "disk") an append-only file on local disk; beyond both budgets new
samples are not cached and are recomputed each epoch. With DDP each rank caches its own samples: a sampler
that keeps each rank's shard fixed across epochs (reshuffling within it) gets every later epoch from cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .transforms import eot_index

ENTRY_OVERHEAD = 256   # bytes of Python bookkeeping per cached sample, charged to the memory budget
Sample = dict[str, torch.Tensor]


@dataclass
class CacheConfig:
    kind: str = "memory"             # "memory" | "disk" (memory first, then spill to local disk)
    dtype: str = "half"              # "half" (16-bit storage) | "fp32" (exact)
    memory_bytes: int = 4 << 30
    disk_bytes: int = 64 << 30
    disk_dir: str | None = None      # local directory for the spill file; default: the stage's out_dir

    def __post_init__(self):
        if self.kind not in ("memory", "disk"):
            raise ValueError(f"cache kind must be 'memory' or 'disk', not {self.kind!r}")
        if self.dtype not in ("half", "fp32"):
            raise ValueError(f"cache dtype must be 'half' or 'fp32', not {self.dtype!r}")


def cache_config(cache: "None | str | CacheConfig") -> CacheConfig | None:
    """None, "memory", "disk" or a CacheConfig -> CacheConfig (None: no cache)."""
    if cache is None or isinstance(cache, CacheConfig):
        return cache
    return CacheConfig(kind=cache)


def _nbytes(sample: Sample) -> int:
    return sum(t.numel() * t.element_size() for t in sample.values())


class FeatureStore:
    """Per-sample features keyed by product id, within byte budgets: memory, then an optional spill file."""

    def __init__(self, memory_bytes: int, disk_bytes: int = 0, disk_dir: str | os.PathLike | None = None):
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes if disk_dir else 0
        self.memory: dict[str, Sample] = {}
        self.disk: dict[str, tuple[int, list[tuple[str, torch.dtype, tuple[int, ...]]]]] = {}
        self.used_memory = self.used_disk = 0
        self.dropped = 0
        self._dir = self._fd = None
        if self.disk_bytes:
            Path(disk_dir).mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="features-", dir=disk_dir)
            self._fd = os.open(os.path.join(self._dir, "features.bin"), os.O_RDWR | os.O_CREAT, 0o600)

    def __contains__(self, key: str) -> bool:
        return key in self.memory or key in self.disk

    def __len__(self) -> int:
        return len(self.memory) + len(self.disk)

    def get(self, key: str) -> Sample | None:
        if key in self.memory:
            return self.memory[key]
        if key in self.disk:
            return self._read(*self.disk[key])
        return None

    def put(self, key: str, sample: Sample) -> bool:
        """Store a sample (CPU tensors it owns); False when every budget is spent."""
        if key in self:
            return True
        size = _nbytes(sample)
        if self.used_memory + size + ENTRY_OVERHEAD <= self.memory_bytes:
            self.memory[key] = sample
            self.used_memory += size + ENTRY_OVERHEAD
            return True
        if self._fd is not None and self.used_disk + size <= self.disk_bytes:
            self.disk[key] = self._write(sample)
            return True
        self.dropped += 1
        return False

    def _write(self, sample: Sample):
        offset, layout = self.used_disk, []
        for name, t in sample.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            os.pwrite(self._fd, raw.tobytes(), self.used_disk)
            self.used_disk += raw.size
            layout.append((name, t.dtype, tuple(t.shape)))
        return offset, layout

    def _read(self, offset: int, layout) -> Sample:
        sizes = [torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() for _, dt, shape in layout]
        buf = bytearray(os.pread(self._fd, sum(sizes), offset))
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        sample, start = {}, 0
        for (name, dtype, shape), size in zip(layout, sizes):
            sample[name] = flat[start:start + size].view(dtype).reshape(shape)
            start += size
        return sample

    def stats(self) -> dict[str, int]:
        return {"samples": len(self), "memory_bytes": self.used_memory, "disk_bytes": self.used_disk,
                "dropped": self.dropped}

    def close(self) -> None:
        """Drop everything; the spill file is deleted (it is only valid for this stage's frozen weights)."""
        self.memory.clear()
        self.disk.clear()
        if self._fd is not None:
            os.close(self._fd)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._fd = None


# ---------------------------------------------------------------------------------------------------------
# Batches <-> per-sample features.

def split_samples(features: dict[str, torch.Tensor]) -> list[Sample]:
    """Batched frozen features -> one dict per sample; text tokens lose their padding (past eot)."""
    n = next(iter(features.values())).shape[0]
    eot = features["eot"].tolist() if "eot" in features else None
    samples = []
    for i in range(n):
        sample = {}
        for name, t in features.items():
            sample[name] = t[i, :eot[i] + 1] if (name == "text" and eot is not None) else t[i]
        samples.append(sample)
    return samples


def collate_samples(samples: Sequence[Sample], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Per-sample features -> a batch in the dtypes they were computed in; text zero-padded past eot."""
    batch = {}
    for name in samples[0]:
        parts = [s[name] for s in samples]
        if name == "text" and "eot" in samples[0]:
            out = parts[0].new_zeros((len(parts), max(p.shape[0] for p in parts), parts[0].shape[-1]))
            for i, p in enumerate(parts):
                out[i, :p.shape[0]] = p
        else:
            out = torch.stack(parts)
        batch[name] = out.to(dtypes.get(name, out.dtype))
    return batch


def storage_dtype(dtype: torch.dtype, mode: str) -> torch.dtype:
    """16-bit features stay as they are (lossless); fp32 ones become fp16 under "half"."""
    if not dtype.is_floating_point or mode == "fp32" or dtype.itemsize <= 2:
        return dtype
    return torch.float16


def quantize(sample: Sample, mode: str) -> Sample:
    """A CPU copy of the sample in its storage dtype (fp32 kept where fp16 would overflow)."""
    out = {}
    for name, t in sample.items():
        q = t.detach().to("cpu", dtype=storage_dtype(t.dtype, mode), copy=True)
        if q.dtype != t.dtype and not torch.isfinite(q).all():
            q = t.detach().to("cpu", copy=True)
        out[name] = q
    return out


def sample_keys(product_ids: Sequence[str], text: torch.Tensor) -> list[str]:
    """Cache keys: product id and a digest of the title's tokens up to end-of-text (the padding depends on
    the batch's longest title, the tokens do not)."""
    rows, ends = text.cpu().numpy(), eot_index(text).tolist()
    return [f"{pid}/{hashlib.blake2b(rows[i, :ends[i] + 1].tobytes(), digest_size=8).hexdigest()}"
            for i, pid in enumerate(product_ids)]


class FeatureCache:
    """A stage's frozen features for each batch: cached samples are reused, the rest computed (as one
    sub-batch of the misses) and stored while the budget lasts. `compute(images, text)` runs the frozen
    part of the model under no_grad and returns its output dict (stages.frozen_forward)."""

    def __init__(self, config: CacheConfig, disk_dir: str | os.PathLike | None = None):
        self.config = config
        spill = config.disk_dir or disk_dir if config.kind == "disk" else None
        if config.kind == "disk" and spill is None:
            raise ValueError("a disk cache needs a local directory (CacheConfig.disk_dir)")
        self.store = FeatureStore(config.memory_bytes, config.disk_bytes, spill)
        self.dtypes: dict[str, torch.dtype] = {}   # the dtype each feature was computed in
        self.hits = self.misses = 0

    def __call__(self, product_ids: Sequence[str], images: torch.Tensor, text: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> dict:
        ids = sample_keys([str(i) for i in product_ids], text)
        samples = [self.store.get(i) for i in ids]
        missing = [k for k, s in enumerate(samples) if s is None]
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = torch.tensor(missing)
            computed = compute(images[rows], text[rows])
            self.dtypes.update({name: t.dtype for name, t in computed.items()})
            for k, sample in zip(missing, split_samples(computed)):
                samples[k] = quantize(sample, self.config.dtype)
                self.store.put(ids[k], samples[k])
        return collate_samples(samples, self.dtypes)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, **self.store.stats()}

    def close(self) -> None:
        self.store.close()
