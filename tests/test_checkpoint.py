"""Checkpoints round-trip exactly and never unpickle."""
import torch

import cmaclip
from cmaclip.checkpoint import Checkpoint, WEIGHTS, is_checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from cmaclip.config import load_config
from cmaclip.pretrained import PretrainedWeightsError, create_clip
from cmaclip.transforms import tokenizer, trim_tokens

import dataclasses
import pytest


def test_round_trip_gives_identical_logits(tmp_path):
    config = load_config("tiny").with_tasks({"color": 4, "style": 2})
    torch.manual_seed(0)
    model = cmaclip.create_model(config).eval()
    labels = {"color": ["red", "blue", "green", "black"], "style": ["dress", "shirt"]}
    save_checkpoint(tmp_path / "ckpt", model, Checkpoint(config, labels, {"color": 0.7}, {"stage": "warmup"}))
    assert is_checkpoint(tmp_path / "ckpt")
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta.labels == labels and meta.thresholds == {"color": 0.7} and meta.config == config
    images = torch.randn(3, 3, 32, 32)
    text = trim_tokens(tokenizer(config)(["red dress", "blue shirt", ""]))
    with torch.no_grad():
        a, b = model(images, text), loaded(images, text)
    for task in labels:
        assert torch.equal(a.logits[task], b.logits[task])
        assert torch.equal(a.image_weight[task], b.image_weight[task])
    # The weights file is safetensors: its header is JSON, not a pickle stream.
    head = (tmp_path / "ckpt" / WEIGHTS).read_bytes()[8:9]
    assert head == b"{"
    assert read_checkpoint_meta(tmp_path / "ckpt").extra == {"stage": "warmup"}


def test_missing_local_weights_file_is_a_clear_error(tmp_path):
    cfg = dataclasses.replace(load_config("tiny").clip, pretrained=str(tmp_path / "nope.bin"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_clip(cfg)


def test_offline_tag_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = dataclasses.replace(load_config("paper-vit-b-32").clip, pretrained="openai")

    def never(*args, **kwargs):  # a hub download, or open_clip's retries before it gives up
        raise AssertionError("reached the network or open_clip")
    monkeypatch.setattr("socket.create_connection", never)
    monkeypatch.setattr("open_clip.create_model", never)
    with pytest.raises(PretrainedWeightsError, match="local file path or an s3:// URI"):
        create_clip(cfg)


def test_local_weights_file_is_loaded(tmp_path):
    cfg = load_config("tiny").clip
    torch.manual_seed(3)
    source = create_clip(cfg)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    loaded = create_clip(dataclasses.replace(cfg, pretrained=str(tmp_path / "weights.pt")))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
