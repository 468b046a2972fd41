"""Preprocessing that turns a product (PIL image, title) into model inputs.

Kept apart from the model so DataLoader workers can build it cheaply (no weights involved).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from open_clip import get_tokenizer
from open_clip.transform import image_transform as _open_clip_image_transform

from .config import CMACLIPConfig


def image_size(config: CMACLIPConfig) -> int:
    vision = config.clip.overrides.get("vision_cfg", {})
    return int(vision.get("image_size", 224))


def image_transform(config: CMACLIPConfig) -> Callable:
    """PIL RGB image -> float tensor [3, H, W], open_clip's eval preprocessing (resize, crop, normalize)."""
    return _open_clip_image_transform(image_size(config), is_train=False)


def tokenizer(config: CMACLIPConfig) -> Callable[[Sequence[str]], torch.Tensor]:
    """titles -> LongTensor [B, context_length]; the BPE vocabulary ships with open_clip (works offline)."""
    tok = get_tokenizer(config.clip.model_name, context_length=config.clip.context_length)

    def tokenize(titles: Sequence[str]) -> torch.Tensor:
        return tok([t or "" for t in titles])

    return tokenize


def eot_index(text: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token: it has the largest id in the vocabulary."""
    return text.argmax(dim=-1)


def trim_tokens(text: torch.Tensor) -> torch.Tensor:
    """Cut the context to the longest sequence in the batch; exact under the causal mask."""
    if text.numel() == 0:
        return text
    length = int(eot_index(text).max()) + 1
    return text[:, :length].contiguous()


def padding_mask(text: torch.Tensor) -> torch.Tensor:
    """True where a text position is padding. Built from positions, since id 0 is also a real token."""
    positions = torch.arange(text.shape[1], device=text.device)
    return positions[None, :] > eot_index(text)[:, None]
