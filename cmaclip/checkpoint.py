"""Checkpoints as a folder: safetensors weights + JSON (config, label vocabularies, thresholds).

Loading never unpickles: the model is rebuilt from its config and the tensors are loaded by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .config import CMACLIPConfig
from .model import CMACLIP, create_model

WEIGHTS, META = "model.safetensors", "cmaclip.json"


@dataclass
class Checkpoint:
    config: CMACLIPConfig
    labels: dict[str, list[str]]                  # task -> class names, index = class id
    thresholds: dict[str, float] = field(default_factory=dict)  # task -> calibrated confidence threshold
    extra: dict[str, Any] = field(default_factory=dict)         # stage, epoch, metrics, ...


def save_checkpoint(path: str | os.PathLike, model: CMACLIP, ckpt: Checkpoint) -> Path:
    """Write weights then metadata, each to a temporary name committed by rename."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path / WEIGHTS)
    meta = {"config": ckpt.config.to_dict(), "labels": ckpt.labels,
            "thresholds": ckpt.thresholds, "extra": ckpt.extra}
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path / META)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> Checkpoint:
    meta = json.loads((Path(path) / META).read_text())
    return Checkpoint(CMACLIPConfig.from_dict(meta["config"]), meta["labels"],
                      {k: float(v) for k, v in meta.get("thresholds", {}).items()}, meta.get("extra", {}))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CMACLIP, Checkpoint]:
    """The model in eval mode and its metadata. No pretrained download: every weight is in the file."""
    ckpt = read_checkpoint_meta(path)
    model = create_model(ckpt.config, load_pretrained=False)
    load_model(model, str(Path(path) / WEIGHTS), device=str(device))
    return model.to(device).eval(), ckpt


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS).exists() and (Path(path) / META).exists()
