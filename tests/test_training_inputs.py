"""Training-time input changes (issue #13): title corruption and image augmentation per stage.

Each title policy is seeded and deterministic, has its own probability, and removes exactly what it says;
image augmentation is seeded and keeps the attribute; a stage without changes trains bit for bit as before
(same samples, same global RNG streams, same weights); the frozen-feature cache never serves a title's
features for another title; configs and checkpoints written before these fields still load and resume.
"""
import dataclasses
import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import cmaclip
from cmaclip.cache import CacheConfig, FeatureCache
from cmaclip.checkpoint import load_checkpoint, save_checkpoint, Checkpoint
from cmaclip.config import TITLE_POLICIES, CMACLIPConfig, StageConfig
from cmaclip.corruption import corrupt_title, sample_rng
from cmaclip.stages import frozen_forward
from cmaclip.train import Callback, train_stage
from cmaclip.transforms import augment_image, image_transform, tokenizer, trim_tokens
from paper.splits import load_split
from pipeline.ingest.dataset import ingest
from pipeline.io.images import DEFAULT_LIMITS
from pipeline.synthetic import make_row
from pipeline.training.data import SampleMaker, make_loader, set_epoch
from tiny_training import one_thread, tiny_model  # noqa: F401

VOCAB = {"color": ["Navy Blue", "Red"], "pattern": ["striped", "plain"]}
NEW_FIELDS = ("drop_title", "remove_label_words", "label_word_tasks", "swap_title", "crop_scale", "flip",
              "color_jitter")


def with_stage(cfg: CMACLIPConfig, stage: str = "warmup", **inputs) -> CMACLIPConfig:
    stages = {**cfg.train.stages, stage: dataclasses.replace(cfg.train.stages[stage], **inputs)}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=stages))


def maker(seed=0, stage="warmup", **inputs) -> SampleMaker:
    cfg = cmaclip.load_config("tiny").with_tasks({t: len(v) for t, v in VOCAB.items()})
    return SampleMaker(with_stage(cfg, stage, **inputs), VOCAB, DEFAULT_LIMITS, stage, seed)


def rows(n):
    return [{"product_id": f"p{i}", "title": f"Brand{i} Men Navy Blue striped Shirt", "color": "Navy Blue",
             "pattern": "striped"} for i in range(n)]


def titles(m: SampleMaker, data, epoch=0):
    pool = [r["title"] for r in data]
    return [m.title(r, epoch, pool, i) for i, r in enumerate(data)]


def outcome(i: int, title: str) -> str | None:
    """Which policy made this title from rows()[i] (each leaves a different trace)."""
    if title == "":
        return "drop_title"
    if title == f"Brand{i} Men Shirt":
        return "remove_label_words"
    if title == f"Brand{i} Men Navy Blue striped Shirt":
        return None
    assert title.endswith(" Men Navy Blue striped Shirt"), title
    return "swap_title"


# ---------------------------------------------------------------------------------------------------------
# Title corruption.

@pytest.mark.parametrize("policy", TITLE_POLICIES)
def test_each_policy_is_seeded_and_deterministic(policy):
    data = rows(200)
    first = titles(maker(0, **{policy: 0.5}), data)
    assert first == titles(maker(0, **{policy: 0.5}), data)
    assert {outcome(i, t) for i, t in enumerate(first)} == {policy, None}
    assert first != titles(maker(1, **{policy: 0.5}), data)                   # another seed
    assert first != titles(maker(0, **{policy: 0.5}), data, epoch=1)          # another epoch
    assert first != titles(maker(0, "end_to_end", **{policy: 0.5}), data)     # another stage


def test_each_policy_has_its_own_probability():
    """2000 samples, a fixed seed: deterministic; the tolerance is over 4 standard errors anyway."""
    data = rows(2000)
    made = titles(maker(0, drop_title=0.2, remove_label_words=0.3, swap_title=0.1), data)
    counts = Counter(outcome(i, t) for i, t in enumerate(made))
    for policy, p in {"drop_title": 0.2, "remove_label_words": 0.3, "swap_title": 0.1, None: 0.4}.items():
        assert abs(counts[policy] / len(data) - p) < 0.05, (policy, counts)


def test_remove_label_words_removes_exactly_the_samples_label_words():
    row = {"product_id": "p", "title": "Men NAVY blue Striped Red Shirt Navyish", "color": "Navy Blue",
           "pattern": "striped"}
    assert maker(remove_label_words=1.0).title(row, pool=[row["title"]]) == "Men Red Shirt Navyish"
    only_color = maker(remove_label_words=1.0, label_word_tasks=["color"])
    assert only_color.title(row, pool=[row["title"]]) == "Men Striped Red Shirt Navyish"
    missing = {**row, "color": None}
    assert maker(remove_label_words=1.0).title(missing, pool=[row["title"]]) == "Men NAVY blue Red Shirt Navyish"
    with pytest.raises(ValueError, match="label_word_tasks"):
        maker(remove_label_words=1.0, label_word_tasks=["style"])


def test_swap_takes_another_products_title():
    data = rows(50)
    swapped = titles(maker(0, swap_title=1.0), data)
    assert all(outcome(i, t) == "swap_title" for i, t in enumerate(swapped))
    assert len(set(swapped)) > 10 and set(swapped) <= {r["title"] for r in data}
    stage = StageConfig(swap_title=1.0)
    assert corrupt_title("alone", {}, stage, random.Random(0), ["alone"], 0) == ""   # nobody to swap with


def test_stage_config_checks_its_input_fields():
    with pytest.raises(ValueError, match="at most 1"):
        StageConfig(drop_title=0.5, swap_title=0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        StageConfig(flip=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        StageConfig(crop_scale=[0.9, 0.5])
    with pytest.raises(ValueError, match="color_jitter"):
        StageConfig(color_jitter=1.0)
    assert not StageConfig().corrupts_titles and not StageConfig().augments_images


# ---------------------------------------------------------------------------------------------------------
# Image augmentation.

def photo(seed=0, size=(60, 80)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_augmentation_is_seeded_and_deterministic():
    cfg = cmaclip.load_config("tiny")
    augment = augment_image(cfg, StageConfig(crop_scale=(0.6, 1.0), flip=0.5, color_jitter=0.2))
    a = augment(photo(), random.Random(1))
    assert a.shape == image_transform(cfg)(photo()).shape
    assert torch.equal(a, augment(photo(), random.Random(1)))
    assert not torch.equal(a, augment(photo(), random.Random(2)))


def test_flip_mirrors_the_eval_image_and_crops_keep_the_colour():
    cfg = cmaclip.load_config("tiny")
    plain = image_transform(cfg)
    flipped = augment_image(cfg, StageConfig(flip=1.0))(photo(), random.Random(0))
    assert torch.equal(flipped, plain(photo()).flip(-1))
    solid = Image.new("RGB", (60, 80), (200, 30, 40))
    crop = augment_image(cfg, StageConfig(crop_scale=(0.5, 0.8), flip=0.5))
    for seed in range(5):
        assert torch.allclose(crop(solid, random.Random(seed)), plain(solid), atol=1.01 / 255 / 0.26)
        assert not torch.equal(crop(photo(), random.Random(seed)), plain(photo()))


# ---------------------------------------------------------------------------------------------------------
# Through the loader: the same samples and RNG streams as before when nothing is asked for.

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    pq.write_table(pa.Table.from_pylist([make_row(21, i) for i in range(150)]), str(root / "catalog.parquet"))
    out = str(root / "out")
    manifest = ingest(str(root / "catalog.parquet"), "color,pattern,style", out, row_group_rows=40,
                      min_class_count=1)
    cfg = cmaclip.load_config("tiny").with_tasks({t: len(v) for t, v in manifest["vocabularies"].items()})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32", patience=0))
    return out, manifest, cfg


def explicit_zeros(cfg: CMACLIPConfig) -> CMACLIPConfig:
    """The config as JSON that spells out every input field at its no-op value."""
    d = cfg.to_dict()
    for stage in d["train"]["stages"].values():
        stage.update(drop_title=0.0, remove_label_words=0.0, label_word_tasks=[], swap_title=0.0,
                     crop_scale=None, flip=0.0, color_jitter=0.0)
    return CMACLIPConfig.from_dict(json.loads(json.dumps(d)))


def epoch_samples(loader, epoch=0):
    set_epoch(loader, epoch)
    return {pid: (b["images"][i], b["text"][i, :int(b["text"][i].argmax()) + 1])
            for b in loader for i, pid in enumerate(b["product_id"])}


def batches_equal(a, b):
    return all(x["product_id"] == y["product_id"] and torch.equal(x["images"], y["images"])
               and torch.equal(x["text"], y["text"]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_stage_without_changes_makes_exactly_the_plain_samples(dataset, in_memory):
    out, _, cfg = dataset
    plain = list(make_loader(out, "train", cfg, batch_size=16, seed=3, in_memory=in_memory))
    for config in (cfg, explicit_zeros(cfg)):
        staged = list(make_loader(out, "train", config, batch_size=16, seed=3, in_memory=in_memory, stage="warmup"))
        assert batches_equal(plain, staged)


def test_changed_samples_are_the_same_for_any_worker_count(dataset):
    out, _, cfg = dataset
    cfg = with_stage(cfg, drop_title=0.2, remove_label_words=0.2, swap_title=0.2, crop_scale=(0.6, 1.0), flip=0.5)
    for in_memory in (True, False):
        runs = [epoch_samples(make_loader(out, "train", cfg, batch_size=16, seed=3, num_workers=w,
                                          in_memory=in_memory, stage="warmup"), epoch=1) for w in (0, 2)]
        assert runs[0].keys() == runs[1].keys()
        assert all(torch.equal(a, b) for pid in runs[0] for a, b in zip(runs[0][pid], runs[1][pid]))
    plain = epoch_samples(make_loader(out, "train", dataset[2], batch_size=16, seed=3), epoch=1)
    changed_text = sum(not torch.equal(plain[p][1], runs[0][p][1]) for p in plain)
    assert 0.3 * len(plain) < changed_text < 0.9 * len(plain)


def test_input_changes_leave_the_global_rng_streams_alone(dataset):
    out, _, cfg = dataset
    changing = with_stage(cfg, drop_title=0.3, swap_title=0.3, crop_scale=(0.6, 1.0), flip=0.5, color_jitter=0.1)
    states = []
    for config in (cfg, changing):
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        epoch_samples(make_loader(out, "train", config, batch_size=16, seed=3, shuffle=True, stage="warmup"))
        states.append((torch.get_rng_state(), random.getstate(), np.random.get_state()[1]))
    assert torch.equal(states[0][0], states[1][0]) and states[0][1] == states[1][1]
    assert np.array_equal(states[0][2], states[1][2])


def train_two_stages(out, cfg, root, cache="memory"):
    model = tiny_model(cfg)
    for stage in ("warmup", "end_to_end"):
        loader = make_loader(out, "train", cfg, batch_size=16, seed=0, in_memory=True, stage=stage)
        val = make_loader(out, "validation", cfg, batch_size=32, in_memory=True)
        train_stage(model, stage, cfg, lambda e, loader=loader: (set_epoch(loader, e), loader)[1], val,
                    root / stage, cache=cache, resume=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zero_corruption_and_no_augmentation_train_exactly_as_the_default(dataset, tmp_path):
    out, _, cfg = dataset
    cfg = dataclasses.replace(cfg, cma=dataclasses.replace(cfg.cma, dropout=0.1))  # the RNG streams matter
    for stage in cfg.train.stages.values():
        stage.epochs = 1
    default = train_two_stages(out, cfg, tmp_path / "default")
    zeros = train_two_stages(out, explicit_zeros(cfg), tmp_path / "zeros")
    assert default.keys() == zeros.keys() and all(torch.equal(default[k], zeros[k]) for k in default)
    corrupted = train_two_stages(out, with_stage(explicit_zeros(cfg), drop_title=0.5), tmp_path / "corrupted")
    assert not all(torch.equal(default[k], corrupted[k]) for k in default)


# ---------------------------------------------------------------------------------------------------------
# The frozen-feature cache and corrupted titles.

def test_cache_never_serves_a_titles_features_for_another_title():
    cfg = cmaclip.load_config("tiny").with_tasks({"color": 3})
    model = tiny_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    clean, dropped = tokenizer(cfg)(["red striped shirt", "blue dress"]), tokenizer(cfg)(["", "blue dress"])

    def compute(images, text):
        with torch.no_grad():
            return frozen_forward(model, "fused", images, trim_tokens(text))

    cache = FeatureCache(CacheConfig(dtype="fp32"))
    first = cache(["a", "b"], images, trim_tokens(clean), compute)
    corrupted = cache(["a", "b"], images, trim_tokens(dropped), compute)
    assert torch.equal(corrupted["text"][0], compute(images[:1], dropped[:1])["text"][0])  # the misses' sub-batch
    assert not torch.equal(corrupted["text"][0], first["text"][0])
    assert torch.equal(corrupted["text"][1], first["text"][1])                   # unchanged title: a hit
    again = cache(["a", "b"], images, trim_tokens(dropped), compute)
    assert torch.equal(again["text"], corrupted["text"]) and cache.stats()["misses"] == 3
    cache.close()


def corrupted_batches(cfg, n=32, micro=8):
    """Fixed batches whose titles are corrupted afresh each epoch, as pipeline.training.data does."""
    g, stage = torch.Generator().manual_seed(1), StageConfig(drop_title=0.3, remove_label_words=0.3)
    colors = ["red", "green", "blue"]
    labels = torch.randint(0, 3, (n,), generator=g)
    pool = [f"slim {colors[int(y)]} shirt {i}" for i, y in enumerate(labels)]
    images, tokenize = torch.randn(n, 3, 32, 32, generator=g), tokenizer(cfg)

    def batches(epoch):
        made = [corrupt_title(t, {"color": colors[int(labels[i])]}, stage,
                              sample_rng(0, "warmup", epoch, f"p{i}", "title"), pool, i) for i, t in enumerate(pool)]
        text = tokenize(made)
        return [{"product_id": [f"p{i}" for i in range(s, s + micro)], "images": images[s:s + micro],
                 "text": trim_tokens(text[s:s + micro]), "labels": {"color": labels[s:s + micro]}}
                for s in range(0, n, micro)]
    return batches


def test_warmup_with_corrupted_titles_and_cache_equals_no_cache(tmp_path):
    cfg = cmaclip.load_config("tiny").with_tasks({"color": 3})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=16, micro_batch_size=8,
                                                             patience=0, precision="fp32"))
    cfg.train.stages["warmup"].epochs = 3
    batches, val = corrupted_batches(cfg), corrupted_batches(cfg)(0)
    runs = []
    for name, cache in (("plain", None), ("cached", CacheConfig(dtype="fp32"))):
        model = tiny_model(cfg)
        result = train_stage(model, "warmup", cfg, batches, val, tmp_path / name, cache=cache)
        runs.append((model.state_dict(), result))
    (plain, _), (cached, result) = runs
    assert all(torch.equal(plain[k], cached[k]) for k in plain)
    assert result.history[-1]["cache/misses"] > 32    # the corrupted variants were computed, not served


class Info(Callback):
    def on_stage_start(self, stage, info):
        self.info = info


def test_a_stage_that_augments_images_is_not_cached(tmp_path):
    cfg = with_stage(cmaclip.load_config("tiny").with_tasks({"color": 3}), flip=0.5)
    cfg.train.stages["warmup"].epochs = 1
    batches = corrupted_batches(cfg)
    seen = Info()
    result = train_stage(tiny_model(cfg), "warmup", cfg, batches, batches(0), tmp_path, cache="memory",
                         callbacks=[seen])
    assert seen.info["cache"] is None and not any(k.startswith("cache/") for k in result.history[0])


# ---------------------------------------------------------------------------------------------------------
# Configs, checkpoints and interrupted stages from before these fields.

def strip_new_fields(config: dict) -> dict:
    for stage in config["train"]["stages"].values():
        for name in NEW_FIELDS:
            stage.pop(name)
    return config


def test_configs_and_checkpoints_without_the_fields_load(tmp_path):
    cfg = cmaclip.load_config("tiny").with_tasks({"color": 3})
    assert CMACLIPConfig.from_dict(strip_new_fields(cfg.to_dict())) == cfg
    changed = with_stage(cfg, crop_scale=[0.7, 1.0], swap_title=0.2, label_word_tasks=["color"])
    assert CMACLIPConfig.from_dict(json.loads(changed.to_json())) == changed
    stages = cmaclip.load_config("tiny").train.stages.values()  # the paper configs turn some on (issue 13)
    assert not any(s.corrupts_titles or s.augments_images or s.modality_loss for s in stages)
    save_checkpoint(tmp_path, tiny_model(cfg), Checkpoint(cfg, {"color": ["r", "g", "b"]}, {"color": 0.5}, {}))
    meta = json.loads((tmp_path / "cmaclip.json").read_text())
    strip_new_fields(meta["config"])
    (tmp_path / "cmaclip.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path)[1].config == cfg


class StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, stage, epoch, metrics):
        raise KeyboardInterrupt


def test_a_stage_interrupted_before_the_fields_existed_resumes(tmp_path):
    cfg = cmaclip.load_config("tiny").with_tasks({"color": 3})
    cfg.train.stages["warmup"].epochs = 2
    batches = corrupted_batches(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_stage(tiny_model(cfg), "warmup", cfg, batches, batches(0), tmp_path, callbacks=[StopAfterFirstEpoch()])
    state = tmp_path / "last" / "state.json"
    meta = json.loads(state.read_text())
    strip_new_fields(meta["config"])
    state.write_text(json.dumps(meta))
    assert train_stage(tiny_model(cfg), "warmup", cfg, batches, batches(0), tmp_path).epochs_run == 2


# ---------------------------------------------------------------------------------------------------------
# The paper protocol's in-memory training batches.

def test_protocol_batches_get_the_stages_changes(dataset):
    out, manifest, cfg = dataset
    cfg = with_stage(cfg, drop_title=1.0)
    split = load_split(out, "train", cfg, manifest["vocabularies"])
    plain = list(split.epochs(16, seed=0, stage="tuning")(0))
    dropped = list(split.epochs(16, seed=0, stage="warmup")(0))
    assert batches_equal(plain, list(split.batches(16, shuffle=True, seed=0, epoch=0)))
    empty = tokenizer(cfg)([""])[0]
    assert all(torch.equal(row, empty[:row.shape[0]]) for b in dropped for row in b["text"])
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(plain, dropped))
