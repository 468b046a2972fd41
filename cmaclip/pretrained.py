"""Building the open_clip model: random weights, an open_clip tag, or a local weights file.

A URI (s3://..., any fsspec URI) is fetched to a local file by `pipeline` first (`pipeline.training.trainer` calls
`pipeline.io.storage.fetch_to_cache`), so this module stays free of fsspec. Offline, a tag fails within
seconds with a message that says what to do, not after a long retry. open_clip's own lines while it builds a
model or a tokenizer go to this module's debug log (`open_clip_lines_to_debug`).
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import open_clip
from torch import nn

from .config import CLIPConfig

HUB_HOST = ("huggingface.co", 443)
OPEN_CLIP_DIR = os.path.dirname(open_clip.__file__)

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """The configured CLIP weights cannot be loaded; the message says how to fix it."""


def is_uri(ref: str) -> bool:
    """A weights reference that names a file in some store rather than on this machine."""
    return "://" in ref


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".bin", ".pt", ".pth", ".safetensors")) or ref.startswith("local-dir:")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained(cfg: CLIPConfig) -> str | None:
    """Check the weights reference before open_clip gets it; returns what to pass as `pretrained`."""
    ref = cfg.pretrained
    if not ref:
        return None
    if is_uri(ref):
        raise PretrainedWeightsError(
            f"pretrained={ref!r} is a URI: fetch it to a local file first "
            "(pipeline.io.storage.fetch_to_cache; pipeline.training.trainer does this for the CLI and the DAGs)")
    if _looks_like_path(ref):
        path = Path(ref.removeprefix("local-dir:")).expanduser()
        if not path.exists():
            raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
        return ref if ref.startswith("local-dir:") else str(path)
    tags = open_clip.list_pretrained_tags_by_model(cfg.model_name)
    if ref not in tags:
        raise PretrainedWeightsError(f"{ref!r} is not an open_clip tag for {cfg.model_name}; known tags: {tags}")
    if not _hub_reachable():
        raise PretrainedWeightsError(
            f"open_clip weights {cfg.model_name}/{ref} need a download and no model hub is reachable "
            "(or HF_HUB_OFFLINE is set). Download the weights where a hub is reachable and set "
            "clip.pretrained to the local file path or an s3:// URI.")
    return ref


class _OpenClipLinesToDebug(logging.Filter):
    """open_clip logs through the root logger, at INFO and WARNING, what the config already decided: "No
    pretrained weights loaded ... initialized randomly" is a random start the config asked for, or the
    weights a checkpoint is about to replace; "Parsing tokenizer identifier" at every tokenizer. Its records
    below ERROR go to this module's debug log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.pathname.startswith(OPEN_CLIP_DIR):
            return True
        log.debug("open_clip: %s", record.getMessage())
        return False


@contextmanager
def open_clip_lines_to_debug() -> Iterator[None]:
    """While open_clip builds something: its log lines below ERROR to this module's debug log."""
    quiet, root = _OpenClipLinesToDebug(), logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def create_clip(cfg: CLIPConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The open_clip CLIP model named by the config, in train mode like open_clip builds it."""
    pretrained = resolve_pretrained(cfg) if load_pretrained else None
    kwargs = dict(cfg.overrides)
    with open_clip_lines_to_debug():
        return open_clip.create_model(cfg.model_name, pretrained=pretrained,
                                      force_quick_gelu=cfg.force_quick_gelu, **kwargs)
