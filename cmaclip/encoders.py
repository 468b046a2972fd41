"""open_clip's image and text towers, emitting whole token sequences in the joint embedding space.

open_clip's own `encode_image` / `encode_text` return one pooled vector per sample. CMA-CLIP's sequence
attention needs every image patch (CLS first) and every text token, projected like the pooled ones, so
token 0 of the image sequence equals `encode_image` and the end-of-text token equals `encode_text`.
"""
from __future__ import annotations

import torch
from torch import nn

from .transforms import padding_mask


def _text_parts(clip: nn.Module) -> nn.Module:
    # CLIP keeps the text tower's modules on the model itself; CustomTextCLIP keeps them in `.text`.
    text = getattr(clip, "text", clip)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [n for n in needed if not hasattr(text, n)]
    if missing:
        raise TypeError(f"unsupported open_clip text tower {type(text).__name__}: lacks {missing}")
    return text


def _check_vision(visual: nn.Module) -> None:
    if not hasattr(visual, "_embeds") or getattr(visual, "attn_pool", None) is not None:
        raise TypeError(f"unsupported open_clip image tower {type(visual).__name__}: need a plain ViT")
    if getattr(visual, "final_ln_after_pool", False) or getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError("unsupported ViT pooling: CMA-CLIP needs CLS-token pooling")


def use_sequence_first_layout(module: nn.Module) -> None:
    """Run open_clip's transformers in [L, B, D] layout.

    Same numbers, but under bf16 the batch-first path of its attention feeds a transposed input into the
    in-projection and copies dominate, which made the bf16 text tower slower than fp32 on CPU. Sequence-first
    feeds the matmul directly.
    """
    for sub in module.modules():
        if hasattr(sub, "resblocks"):
            sub.batch_first = False
        if isinstance(sub, nn.MultiheadAttention):
            sub.batch_first = False


class CLIPTowers(nn.Module):
    """Image and text token sequences of an open_clip CLIP model, both in the joint space."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        _check_vision(clip.visual)
        self.clip = clip
        self.text = _text_parts(clip)
        use_sequence_first_layout(clip)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + patches, D]; token 0 is CLS."""
        visual = self.clip.visual
        x = visual.transformer(visual._embeds(images))
        return visual.ln_post(x) @ visual.proj

    def encode_text_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids (L may be trimmed below the context) -> ([B, L, D] tokens, [B, L] padding mask)."""
        t, length = self.text, text.shape[1]
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(text).to(cast_dtype) + t.positional_embedding[:length].to(cast_dtype)
        # The causal mask makes every position up to end-of-text independent of what follows it.
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:length, :length]))
        proj = t.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x, padding_mask(text)
