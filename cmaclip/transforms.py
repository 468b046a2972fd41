"""Preprocessing that turns a product (PIL image, title) into model inputs.

Kept apart from the model so DataLoader workers can build it cheaply (no weights involved).
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from open_clip import get_tokenizer
from open_clip.transform import image_transform as _open_clip_image_transform
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor
from torchvision.transforms import functional as F

from .config import CMACLIPConfig, StageConfig
from .pretrained import open_clip_lines_to_debug


def image_size(config: CMACLIPConfig) -> int:
    vision = config.clip.overrides.get("vision_cfg", {})
    return int(vision.get("image_size", 224))


def image_transform(config: CMACLIPConfig) -> Callable:
    """PIL RGB image -> float tensor [3, H, W], open_clip's eval preprocessing (resize, crop, normalize)."""
    return _open_clip_image_transform(image_size(config), is_train=False)


def augment_image(config: CMACLIPConfig, stage: StageConfig) -> Callable[[Any, random.Random], torch.Tensor]:
    """PIL RGB image, generator -> float tensor [3, H, W]: a training stage's augmentation, then the same
    tensor conversion and normalization as `image_transform`. Only changes that keep the attribute:

    - crop (stage.crop_scale): a square whose area is a uniform fraction of the eval crop's, anywhere in the
      image resized as eval resizes it (shorter side = size), resized back to size x size. The aspect stays,
      unlike RandomResizedCrop's, and so does most of the product: eval sees a centred square of the same size.
    - flip: horizontal, with probability stage.flip (left and right are no product attribute here).
    - color_jitter: brightness, contrast and saturation each scaled by a factor in [1 - x, 1 + x]. An opt-in:
      it changes what the colour labels describe.

    Every draw comes from `rng` (cmaclip.corruption.sample_rng), never from the global RNGs."""
    size, steps = image_size(config), list(image_transform(config).transforms)
    centre, tensor = Compose(steps[:-2]), Compose(steps[-2:])  # eval's resize + crop; to tensor + normalize

    def transform(image, rng: random.Random) -> torch.Tensor:
        image = image if image.mode == "RGB" else image.convert("RGB")
        if stage.crop_scale is None:
            image = centre(image)
        else:
            scale = size / min(image.size)  # eval's resize factor
            side = size * math.sqrt(rng.uniform(*stage.crop_scale)) / scale  # in source pixels
            x, y = rng.uniform(0, image.size[0] - side), rng.uniform(0, image.size[1] - side)
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + side, y + side))
        if stage.flip > 0 and rng.random() < stage.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if stage.color_jitter > 0:
            lo, hi = 1.0 - stage.color_jitter, 1.0 + stage.color_jitter
            image = F.adjust_brightness(image, rng.uniform(lo, hi))
            image = F.adjust_contrast(image, rng.uniform(lo, hi))
            image = F.adjust_saturation(image, rng.uniform(lo, hi))
        return tensor(image)

    return transform


def image_batch_transform(config: CMACLIPConfig) -> Callable[[Sequence[Any]], torch.Tensor]:
    """PIL RGB images -> float tensor [B, 3, H, W], bit for bit `torch.stack` of `image_transform`.

    Resize and crop stay per image (PIL); the uint8 -> float conversion and the normalization run once on
    the whole batch, which takes a quarter off the preprocessing time: it is the scoring workers' largest
    cost after the resize, and on a small CPU they share the cores with the forward pass.
    """
    size = image_size(config)
    per_image = image_transform(config)
    steps = list(per_image.transforms)
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return lambda images: torch.stack([per_image(im) for im in images]) if images else _empty(size)
    geometric, normalize = Compose(steps[:-2]), steps[-1]
    mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def transform(images: Sequence[Any]) -> torch.Tensor:
        if not images:
            return _empty(size)
        hwc = torch.from_numpy(np.stack([np.asarray(geometric(im)) for im in images]))
        # The same float32 ops as torchvision's to_tensor + normalize, so the same bits.
        pixels = torch.empty(hwc.shape[0], hwc.shape[3], hwc.shape[1], hwc.shape[2])
        pixels.copy_(hwc.permute(0, 3, 1, 2))
        return pixels.div_(255).sub_(mean).div_(std)

    return transform


def _empty(size: int) -> torch.Tensor:
    return torch.empty(0, 3, size, size)


# The longest entry of CLIP's BPE vocabulary spells 32 bytes, a byte is at most one character, and between
# two tokens the tokenizer drops at most one space (pipeline.io.text collapses runs of whitespace). So a title
# whose tokens fit in a context of n holds fewer than n * CHARS_PER_TOKEN characters. Not counted: HTML
# character references ("&amp;" is one token) and the invisible characters ftfy deletes; a title padded
# with thousands of those can lose the end the model would otherwise have seen the start of.
CHARS_PER_TOKEN = 33


def max_title_chars(context_length: int) -> int:
    """The most characters of a title that can reach a context of `context_length` tokens."""
    return context_length * CHARS_PER_TOKEN


def tokenizer(config: CMACLIPConfig) -> Callable[[Sequence[str]], torch.Tensor]:
    """titles -> LongTensor [B, context_length]; the BPE vocabulary ships with open_clip (works offline).

    Titles are cut to `max_title_chars` first: the tokenizer cleans and BPE-encodes the whole string in
    Python before truncating to the context, so a 1 MiB title would cost seconds for tokens never read."""
    with open_clip_lines_to_debug():
        tok = get_tokenizer(config.clip.model_name, context_length=config.clip.context_length)
    limit = max_title_chars(config.clip.context_length)

    def tokenize(titles: Sequence[str]) -> torch.Tensor:
        return tok([(t or "")[:limit] for t in titles])

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
