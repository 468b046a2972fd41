"""The version of a local checkpoint names what the model computes: identical weights, labels and thresholds
give one version whatever the file bytes; a changed weight, label or threshold gives another."""
import json

import torch
from safetensors.torch import load_file, save_file

from cmaclip.checkpoint import META, WEIGHTS, Checkpoint, save_checkpoint
from cmaclip.train import train_stage
from pipeline.scoring.predictor import checkpoint_version
from tiny_training import collate, loader, one_thread, samples, tiny_config, tiny_model  # noqa: F401

LABELS = {"color": ["red", "green", "blue"], "pattern": ["plain", "striped"]}


def _save(path, model, thresholds=None, extra=None):
    cfg = tiny_config()
    return save_checkpoint(path, model, Checkpoint(cfg, LABELS, thresholds or {"color": 0.5}, extra or {}))


def test_same_weights_other_file_bytes_same_version(tmp_path):
    model = tiny_model(tiny_config())
    a = _save(tmp_path / "a", model, extra={"epoch": 1})
    # The same tensors, written in the other order with other header metadata; the JSON with another
    # layout, and another `extra`.
    b = tmp_path / "b"
    b.mkdir()
    stored = load_file(a / WEIGHTS)
    save_file(dict(reversed(stored.items())), b / WEIGHTS, metadata={"format": "pt", "saved_by": "another process"})
    meta = json.loads((a / META).read_text())
    meta["extra"] = {"epoch": 7, "metrics": {"loss": 0.25}}
    (b / META).write_text(json.dumps(meta, indent=4))
    assert (a / WEIGHTS).read_bytes() != (b / WEIGHTS).read_bytes()
    assert (a / META).read_bytes() != (b / META).read_bytes()
    assert checkpoint_version(a) == checkpoint_version(b)


def test_a_changed_weight_threshold_or_label_changes_the_version(tmp_path):
    model = tiny_model(tiny_config())
    base = checkpoint_version(_save(tmp_path / "base", model))
    assert checkpoint_version(_save(tmp_path / "threshold", model, thresholds={"color": 0.6})) != base
    relabelled = _save(tmp_path / "labels", model)
    meta = json.loads((relabelled / META).read_text())
    meta["labels"]["color"] = ["red", "blue", "green"]
    (relabelled / META).write_text(json.dumps(meta))
    assert checkpoint_version(relabelled) != base
    with torch.no_grad():
        next(iter(model.heads.parameters())).view(-1)[0] += 1e-3
    assert checkpoint_version(_save(tmp_path / "weight", model)) != base


def test_two_trainings_with_identical_weights_give_the_same_model_version(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16)
    cfg.train.stages["warmup"].epochs = 2
    train, val = loader(samples(cfg, 32, 1), 16), [collate(samples(cfg, 16, 2), range(16))]
    results = [train_stage(tiny_model(cfg), "warmup", cfg, train, val, tmp_path / run, labels=LABELS)
               for run in ("first", "second")]
    first, second = (r.best_checkpoint for r in results)
    assert first != second
    assert checkpoint_version(first) == checkpoint_version(second)
