"""Frozen-feature caches: bounded storage, exact round trips, and the same training result as no cache.

"Same result" measured honestly (see cmaclip/cache.py):
  * fp32 storage, same batches every epoch: bit-identical weights.
  * fp32 storage, reshuffled batches: text tokens move by ~1e-6 when a batch's trimmed length changes, so
    weights agree to a small fraction of how far training moved them, with the same metrics.
  * half storage of fp32 features: fp16 rounding, likewise small relative to training, same metrics.
  * bf16 autocast + half storage: lossless, bit-identical.
"""
from pathlib import Path

import pytest
import torch

from cmaclip.cache import CacheConfig, FeatureCache, FeatureStore, collate_samples, quantize, split_samples
from cmaclip.stages import frozen_forward
from cmaclip.train import train_stage
from cmaclip.transforms import trim_tokens
from tiny_training import collate, loader, one_thread, samples, tiny_config, tiny_model  # noqa: F401


def train(stage, cache, tmp_path, *, shuffle=False, precision="fp32", epochs=3):
    """(start weights, end weights, result) of a small stage run; micro-batches of 8 trim differently."""
    cfg = tiny_config(batch_size=16, micro_batch_size=8, patience=0, precision=precision)
    cfg.train.stages[stage].epochs = epochs
    model = tiny_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_stage(model, stage, cfg, loader(samples(cfg, 32, 1), 8, shuffle),
                         [collate(samples(cfg, 16, 2), range(16))], tmp_path, cache=cache, resume=False)
    return start, {k: v.clone() for k, v in model.state_dict().items()}, result


def identical(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def relative_difference(start, a, b):
    """|a - b| over |b - start|: the gap between two runs relative to how far training moved the weights."""
    flat = lambda sd: torch.cat([v.flatten().float() for v in sd.values()])  # noqa: E731
    return float((flat(a) - flat(b)).norm() / (flat(b) - flat(start)).norm())


# ---------------------------------------------------------------------------------------------------------
# Storage.

def sample(seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(5, 4, generator=g).to(dtype), "text": torch.randn(3, 4, generator=g).to(dtype),
            "eot": torch.tensor(2)}


def test_store_is_bounded_memory_then_disk_then_dropped(tmp_path):
    size = sum(t.numel() * t.element_size() for t in sample(0).values())
    store = FeatureStore(memory_bytes=2 * (size + 256), disk_bytes=2 * size, disk_dir=tmp_path)
    originals = {f"p{i}": sample(i, torch.bfloat16 if i % 2 else torch.float16) for i in range(6)}
    stored = [store.put(k, v) for k, v in originals.items()]
    assert stored == [True, True, True, True, False, False]
    assert store.stats() == {"samples": 4, "memory_bytes": 2 * (size + 256), "disk_bytes": 2 * size,
                             "dropped": 2}
    for key in ("p0", "p1", "p2", "p3"):                    # memory and disk give back the exact tensors
        got = store.get(key)
        assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in originals[key].items())
    assert store.get("p4") is None and "p2" in store
    spill = list(tmp_path.iterdir())
    assert len(spill) == 1 and (spill[0] / "features.bin").stat().st_size == 2 * size
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_quantize_keeps_16_bit_features_and_rounds_fp32_to_fp16():
    x = torch.randn(4, 8)
    assert quantize({"a": x}, "half")["a"].dtype == torch.float16
    assert torch.equal(quantize({"a": x}, "fp32")["a"], x)
    bf = x.bfloat16()
    assert torch.equal(quantize({"a": bf}, "half")["a"], bf)
    huge = torch.full((2,), 1e6)                            # out of fp16 range: kept in fp32
    assert torch.equal(quantize({"a": huge}, "half")["a"], huge)
    eot = torch.tensor([3, 1])
    assert torch.equal(quantize({"eot": eot}, "half")["eot"], eot)


@pytest.mark.parametrize("prefix", ["tokens", "fused"])
def test_split_and_collate_rebuild_the_batch(prefix):
    cfg = tiny_config()
    model = tiny_model(cfg).eval()
    batch = collate(samples(cfg, 6, 3), range(6))
    with torch.no_grad():
        features = frozen_forward(model, prefix, batch["images"], batch["text"])
    rebuilt = collate_samples(split_samples(features), {k: v.dtype for k, v in features.items()})
    assert rebuilt.keys() == features.keys()
    if prefix == "tokens":
        keep = torch.arange(features["text"].shape[1])[None, :] <= features["eot"][:, None]
        assert torch.equal(rebuilt["text"][keep], features["text"][keep])
        assert rebuilt["text"][~keep].abs().sum() == 0       # padding dropped, rebuilt as zeros
        assert rebuilt["text"].shape == features["text"].shape and torch.equal(rebuilt["eot"], features["eot"])
        assert torch.equal(rebuilt["image"], features["image"])
    else:
        assert all(torch.equal(rebuilt[k], features[k]) for k in features)


def test_feature_cache_computes_only_misses_and_uses_stored_values_throughout(tmp_path):
    cfg = tiny_config()
    model = tiny_model(cfg).eval()
    data = samples(cfg, 8, 4)
    calls = []

    def compute(images, text):
        calls.append(images.shape[0])
        with torch.no_grad():
            return frozen_forward(model, "fused", images, trim_tokens(text))

    cache = FeatureCache(CacheConfig(dtype="half"))
    first = cache(data["ids"][:4], data["images"][:4], trim_tokens(data["text"][:4]), compute)
    mixed = cache(data["ids"][2:6], data["images"][2:6], trim_tokens(data["text"][2:6]), compute)
    assert calls == [4, 2] and cache.stats()["hits"] == 2 and cache.stats()["misses"] == 6
    assert first["image"].dtype == torch.float32              # back in the dtype it was computed in
    assert torch.equal(mixed["image"][:2], first["image"][2:])
    # Also the batch that computed a feature uses its stored (fp16-rounded) value.
    assert torch.equal(first["image"], first["image"].half().float())
    cache.close()


# ---------------------------------------------------------------------------------------------------------
# Same training result with and without the cache.

@pytest.mark.parametrize("stage", ["warmup", "tuning"])
def test_fp32_cache_same_batches_is_bit_identical_to_no_cache(tmp_path, stage):
    start, plain, r_plain = train(stage, None, tmp_path / "plain")
    _, cached, r_cached = train(stage, CacheConfig(dtype="fp32"), tmp_path / "cached")
    assert identical(plain, cached)
    assert r_plain.best_metrics == r_cached.best_metrics
    hits = [h["cache/hits"] for h in r_cached.history]
    assert hits == [0, 32, 64] and r_cached.history[-1]["cache/misses"] == 32   # later epochs from cache


@pytest.mark.parametrize("stage", ["warmup", "tuning"])
def test_cache_with_reshuffled_batches_and_half_storage_agrees_closely(tmp_path, stage):
    start, plain, r_plain = train(stage, None, tmp_path / "plain", shuffle=True)
    for dtype, bound in (("fp32", 1e-3), ("half", 2e-2)):
        _, cached, r_cached = train(stage, CacheConfig(dtype=dtype), tmp_path / dtype, shuffle=True)
        assert relative_difference(start, cached, plain) < bound, dtype
        assert r_cached.best_metrics["mean_accuracy"] == r_plain.best_metrics["mean_accuracy"]
        assert r_cached.best_metrics["loss"] == pytest.approx(r_plain.best_metrics["loss"], abs=1e-4)


def test_bf16_autocast_with_half_cache_is_bit_identical(tmp_path):
    _, plain, _ = train("warmup", None, tmp_path / "plain", precision="bf16", epochs=2)
    _, cached, r_cached = train("warmup", "memory", tmp_path / "cached", precision="bf16", epochs=2)
    assert identical(plain, cached) and r_cached.history[-1]["cache/hits"] == 32


def test_disk_spill_gives_the_same_result_and_is_removed(tmp_path):
    _, in_memory, _ = train("warmup", CacheConfig(dtype="half"), tmp_path / "memory")
    spill = CacheConfig(kind="disk", dtype="half", memory_bytes=0, disk_dir=str(tmp_path / "spill"))
    _, on_disk, result = train("warmup", spill, tmp_path / "disk")
    assert identical(in_memory, on_disk)
    assert result.history[-1]["cache/disk_bytes"] > 0 and result.history[-1]["cache/memory_bytes"] == 0
    assert list(Path(tmp_path / "spill").iterdir()) == []


def test_budget_bounds_the_cache_and_the_rest_is_recomputed(tmp_path):
    cfg = tiny_config()
    with torch.no_grad():
        m = tiny_model(cfg).eval()
        one = collate(samples(cfg, 1, 1), [0])
        tokens = frozen_forward(m, "tokens", one["images"], one["text"])
    per_sample = tokens["image"][0].numel() * 2 + 256             # at least: fp16 image tokens + bookkeeping
    budget = 12 * per_sample
    start, unbounded, _ = train("warmup", CacheConfig(dtype="half"), tmp_path / "all")
    _, bounded, result = train("warmup", CacheConfig(dtype="half", memory_bytes=budget), tmp_path / "some")
    last = result.history[-1]
    assert last["cache/memory_bytes"] <= budget and last["cache/dropped"] > 0 and last["cache/samples"] < 32
    assert 0 < last["cache/hits"] < 96
    # Recomputed samples are rounded the same way as stored ones; they only differ by batch composition.
    assert relative_difference(start, bounded, unbounded) < 1e-3
