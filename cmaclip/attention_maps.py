"""Where a title word looks in the image (paper Figure 2): the query of a text token against the keys of
the image patches in one sequence-attention layer, softmaxed over the patches.

Read from the model's own modules (`proj_in`, each layer's `norm1` and `self_attn` projections), so the
map is the attention the model computes, not a re-implementation of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .model import CMACLIP


def phrase_token_positions(tokenizer, title: str, phrase: str) -> list[int]:
    """Positions (in the tokenized title, start-of-text = 0) of the BPE tokens of every word of `phrase`
    that occurs in `title` as a whole word, case-insensitive. [] when there is none, or when the
    piecewise encoding does not reproduce the tokenizer's own (then positions would be guesses)."""
    words = {w.lower() for w in phrase.split()}
    pieces = tokenizer.pat.findall(tokenizer.clean_fn(title))  # the `regex` module pattern it splits on
    positions, offset, total = [], 1, []
    for piece in pieces:
        ids = tokenizer.encode(piece)
        if piece.lower() in words:
            positions.extend(range(offset, offset + len(ids)))
        offset += len(ids)
        total.extend(ids)
    if total != tokenizer.encode(title):
        return []
    return positions


def default_layer(model: CMACLIP) -> int:
    """The deepest layer whose text-token queries still matter: in the last layer only the image CLS and
    the end-of-text outputs reach the heads, so a word's query there is never trained."""
    return max(len(model.sequence_attention.encoder.layers) - 2, 0)


def _layer_input(model: CMACLIP, seq: torch.Tensor, padding: torch.Tensor, layer: int) -> torch.Tensor:
    sa = model.sequence_attention
    x = sa.proj_in(seq)
    x = x.transpose(0, 1) if sa.sequence_first else x
    for block in sa.encoder.layers[:layer]:
        x = block(x, src_key_padding_mask=padding)
    return x.transpose(0, 1) if sa.sequence_first else x


def _queries_keys(block: torch.nn.TransformerEncoderLayer, x: torch.Tensor):
    """Per-head queries and keys [B, heads, S, d] of the block's self-attention on input x."""
    if not block.norm_first:
        raise TypeError("attention maps expect pre-norm layers (norm_first=True), as SequenceAttention builds")
    attn = block.self_attn
    q, k, _ = F.linear(block.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # noqa: E731
    return split(q), split(k)


@torch.no_grad()
def word_patch_attention(model: CMACLIP, images: torch.Tensor, text: torch.Tensor,
                         positions: Sequence[Sequence[int]], layer: int | None = None) -> torch.Tensor:
    """[B, grid_h, grid_w]: for each sample, the attention of its text tokens at `positions[b]` over the
    image patches (CLS excluded), softmaxed over the patches per head, then averaged over heads and over
    the tokens. Needs a model with both modalities and sequence attention."""
    if model.sequence_attention is None or not (model.use_image and model.use_text):
        raise ValueError("attention maps need the sequence attention over both image and text")
    model.eval()
    layer = default_layer(model) if layer is None else layer
    tokens = model.encode_tokens(images, text)
    n_image = tokens.image.shape[1]
    seq = torch.cat([tokens.image, tokens.text], dim=1)
    padding = torch.cat([tokens.text_padding.new_zeros(tokens.image.shape[:2]), tokens.text_padding], dim=1)
    q, k = _queries_keys(model.sequence_attention.encoder.layers[layer],
                         _layer_input(model, seq.float(), padding, layer))
    scale = q.shape[-1] ** -0.5
    grid = model.towers.clip.visual.grid_size
    maps = []
    for b, pos in enumerate(positions):
        rows = torch.as_tensor([n_image + p for p in pos], dtype=torch.long)
        scores = q[b][:, rows] @ k[b][:, 1:n_image].transpose(-1, -2) * scale   # [heads, tokens, patches]
        maps.append(torch.softmax(scores.float(), dim=-1).mean(dim=(0, 1)).reshape(grid))
    return torch.stack(maps)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[B, gh, gw] -> [B, size, size], bilinear, each map rescaled to [0, 1] for display."""
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = up.flatten(1).min(dim=1).values[:, None, None]
    high = up.flatten(1).max(dim=1).values[:, None, None]
    return (up - low) / (high - low).clamp(min=1e-12)

