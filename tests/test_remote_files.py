"""Files the pipeline moves between an object store and the local disk, against moto's S3 server: CLIP
weights named by `clip.pretrained = s3://...` (fetched once per object version), and a stage's checkpoint
snapshots (folders put and got whole)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cmaclip
from pipeline.io import storage
from pipeline.training import trainer

pytestmark = pytest.mark.services


def test_fetch_to_cache_once_per_object_version(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "weights/clip.safetensors")
    storage.write_bytes(uri, b"first version")
    cache = tmp_path / "cache"
    first = storage.fetch_to_cache(uri, cache)
    assert Path(first).read_bytes() == b"first version" and Path(first).name == "clip.safetensors"
    inode = os.stat(first).st_ino
    assert storage.fetch_to_cache(uri, cache) == first and os.stat(first).st_ino == inode  # not fetched again
    storage.write_bytes(uri, b"second version, longer")
    second = storage.fetch_to_cache(uri, cache)
    assert second != first and Path(second).read_bytes() == b"second version, longer"
    assert Path(first).read_bytes() == b"first version"  # a run still reading the old version keeps it
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]  # no partial downloads left
    with pytest.raises(FileNotFoundError, match="not a file"):
        storage.fetch_to_cache(storage.join(s3_bucket, "weights"), cache)
    local = tmp_path / "w.safetensors"
    local.write_bytes(b"local")
    assert storage.fetch_to_cache(str(local), cache) == str(local)  # a local file is used where it is


def test_training_builds_the_model_from_s3_weights(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path / "home"))
    config = cmaclip.load_config("tiny").with_tasks({"color": 3})
    torch.manual_seed(123)
    weights = cmaclip.create_model(config, load_pretrained=False).towers.clip.state_dict()
    local = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(local))
    uri = storage.join(s3_bucket, "clip/tiny.safetensors")
    storage.write_bytes(uri, local.read_bytes())
    config = dataclasses.replace(config, clip=dataclasses.replace(config.clip, pretrained=uri))

    with pytest.raises(cmaclip.pretrained.PretrainedWeightsError, match="fetch_to_cache"):
        cmaclip.create_model(config)  # the model library never reads a store itself
    model = trainer._initial_model(config)
    loaded = model.towers.clip.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert any(p.name == "tiny.safetensors" for p in (tmp_path / "home" / "cache").rglob("*"))


def _stage_folder(root: Path, epoch: int) -> Path:
    for sub in ("last", "best"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "model.safetensors").write_bytes(os.urandom(1000))
        (root / sub / "state.json").write_text(json.dumps({"state": {"epoch": epoch}}))
    return root


def test_checkpoint_snapshots_round_trip_through_s3(s3_bucket: str, tmp_path: Path) -> None:
    remote = storage.join(s3_bucket, "run/stages/warmup")
    stage = _stage_folder(tmp_path / "trainer", 0)
    trainer._publish_snapshot(stage, remote, epochs=1, improved=True)
    best_then = (stage / "best" / "model.safetensors").read_bytes()
    _stage_folder(stage, 1)
    trainer._publish_snapshot(stage, remote, epochs=2, improved=False)  # last moves on, best stays

    worker = tmp_path / "worker" / "warmup"
    trainer._fetch_snapshot(remote, worker)
    assert sorted(p.name for p in (worker / "last").iterdir()) == ["model.safetensors", "state.json"]
    for name in ("model.safetensors", "state.json"):
        assert (worker / "last" / name).read_bytes() == (stage / "last" / name).read_bytes()
    assert (worker / "best" / "model.safetensors").read_bytes() == best_then
    assert storage.list_files(storage.join(remote, "snapshots")) == sorted(  # snapshot 1 kept for its best
        storage.join(remote, f"snapshots/{n}/{sub}/{f}") for n, sub in ((1, "best"), (1, "last"), (2, "last"))
        for f in ("model.safetensors", "state.json"))
