"""CMA-CLIP (Liu et al.): CLIP token sequences -> sequence-wise attention -> per task, modality-wise
attention and an MLP head. Paper section 3.2; names follow it.

    image ─ CLIP image tower ─ [CLS, patches] ┐
                                               ├─ concat ─ SequenceAttention ─ I'[CLS], T'[EOT]
    title ─ CLIP text tower ── [tokens]  ──────┘                                    │
                       for each task k: ModalityAttention_k ─ c_k ─ MLPHead_k ─ logits_k
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import CMACLIPConfig, CMAConfig
from .encoders import CLIPTowers
from .pretrained import create_clip
from .transforms import eot_index


@dataclass
class Tokens:
    """CLIP's output for a batch: either modality may be absent in a single-modality variant."""
    image: torch.Tensor | None          # [B, 1 + patches, D], CLS first
    text: torch.Tensor | None           # [B, L, D]
    text_padding: torch.Tensor | None   # [B, L], True = padding
    eot: torch.Tensor | None            # [B], position of the end-of-text token


@dataclass
class CMACLIPOutput:
    logits: dict[str, torch.Tensor]        # task -> [B, classes]
    image_weight: dict[str, torch.Tensor]  # task -> [B], lambda of equation (6)
    # task -> {"image": head(I'), "text": head(T')}: each modality classified alone (training's
    # per-modality loss asks for them; None otherwise)
    modality_logits: dict[str, dict[str, torch.Tensor]] | None = None


class SequenceAttention(nn.Module):
    """Transformer encoder over the concatenated image and text token sequences (section 3.2.1).

    Takes and returns [B, S, D]. Inside, the encoder runs batch-first (torch's fused inference kernel:
    fastest in fp32) or, after `set_sequence_first(True)`, in [S, B, D]: the same numbers, and in bf16 on
    CPU ~1.3x faster, because batch-first attention there feeds a transposed input to the in-projection
    (the trap `encoders.use_sequence_first_layout` avoids in the towers; bench/forward.py times both layouts).
    Training speed does not depend on it."""

    def __init__(self, cfg: CMAConfig, embed_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, cfg.width) if embed_dim != cfg.width else nn.Identity()
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(cfg.width),
                                             enable_nested_tensor=False)
        self.sequence_first = False

    def set_sequence_first(self, sequence_first: bool) -> None:
        self.sequence_first = sequence_first
        for layer in self.encoder.layers:  # the encoder and its layers read the layout from self_attn
            layer.self_attn.batch_first = not sequence_first

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = self.proj_in(tokens)
        if not self.sequence_first:
            return self.encoder(x, src_key_padding_mask=padding)
        return self.encoder(x.transpose(0, 1), src_key_padding_mask=padding).transpose(0, 1)


class ModalityAttention(nn.Module):
    """Keyless attention (Xiang et al. 2018), equations (3)-(6):
    e_I = w^T I', e_T = w^T T', lambda = softmax(e_I, e_T)_I, c = lambda I' + (1 - lambda) T'.
    With `learnable=False` lambda is fixed at 0.5 (the paper's "w/o MA" ablation)."""

    def __init__(self, dim: int, learnable: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) * dim ** -0.5) if learnable else None

    def forward(self, image: torch.Tensor | None, text: torch.Tensor | None):
        if text is None:
            return image, image.new_ones(image.shape[0])
        if image is None:
            return text, text.new_zeros(text.shape[0])
        if self.w is None:
            lam = image.new_full((image.shape[0],), 0.5)
        else:
            lam = torch.softmax(torch.stack([image @ self.w, text @ self.w], dim=-1), dim=-1)[:, 0]
        c = lam[:, None] * image + (1 - lam[:, None]) * text
        return c, lam


class MLPHead(nn.Module):
    """Classification head of one task (section 3.2.3)."""

    def __init__(self, dim: int, hidden: int, classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)


class CMACLIP(nn.Module):
    """The full model. `forward` = `classify(fuse(encode_tokens(...)))`; the three steps are public so
    training can cache what a frozen stage never changes (CLIP tokens in warm-up, I' and T' in tuning)."""

    def __init__(self, config: CMACLIPConfig, clip: nn.Module):
        super().__init__()
        if not config.tasks:
            raise ValueError("config.tasks is empty: set task -> number of classes (config.with_tasks)")
        cma = config.cma
        if cma.modalities not in ("image+text", "image", "text"):
            raise ValueError(f"cma.modalities must be image+text, image or text, not {cma.modalities!r}")
        self.config = config
        self.towers = CLIPTowers(clip)
        self.use_image = cma.modalities in ("image+text", "image")
        self.use_text = cma.modalities in ("image+text", "text")
        dim = self.towers.embed_dim
        self.sequence_attention = SequenceAttention(cma, dim) if cma.sequence_attention else None
        dim = cma.width if cma.sequence_attention else dim
        self.modality_attention = nn.ModuleDict(
            {t: ModalityAttention(dim, learnable=cma.modality_attention) for t in config.tasks})
        self.heads = nn.ModuleDict(
            {t: MLPHead(dim, cma.head_hidden, n, cma.dropout) for t, n in config.tasks.items()})

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def encode_tokens(self, images: torch.Tensor | None, text: torch.Tensor | None) -> Tokens:
        image = self.towers.encode_image_tokens(images) if self.use_image else None
        if not self.use_text:
            return Tokens(image, None, None, None)
        text_tokens, padding = self.towers.encode_text_tokens(text)
        return Tokens(image, text_tokens, padding, eot_index(text))

    def fuse(self, tokens: Tokens) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sequence-wise attention; returns the global embeddings I'[CLS] and T'[EOT]."""
        seq, padding, n_image = self._concat(tokens)
        if self.sequence_attention is not None:
            seq = self.sequence_attention(seq, padding)
        rows = torch.arange(seq.shape[0], device=seq.device)
        image = seq[:, 0] if tokens.image is not None else None
        text = seq[rows, n_image + tokens.eot] if tokens.text is not None else None
        return image, text

    @staticmethod
    def _concat(tokens: Tokens):
        parts = [t for t in (tokens.image, tokens.text) if t is not None]
        n_image = 0 if tokens.image is None else tokens.image.shape[1]
        padding = None
        if tokens.text is not None and tokens.image is not None:
            no_pad = tokens.text_padding.new_zeros(tokens.image.shape[:2])
            padding = torch.cat([no_pad, tokens.text_padding], dim=1)
        elif tokens.text is not None:
            padding = tokens.text_padding
        return torch.cat(parts, dim=1), padding, n_image

    def classify(self, image: torch.Tensor | None, text: torch.Tensor | None,
                 per_modality: bool = False) -> CMACLIPOutput:
        """Each task's head on c (equation 6); with `per_modality`, also on I' alone and T' alone: the same
        head, so each global embedding must name the label by itself (the auxiliary loss of training)."""
        logits, weights, alone = {}, {}, {} if per_modality else None
        for task in self.config.tasks:
            c, lam = self.modality_attention[task](image, text)
            logits[task], weights[task] = self.heads[task](c), lam
            if per_modality:
                present = {"image": image, "text": text}
                alone[task] = {m: self.heads[task](x) for m, x in present.items() if x is not None}
        return CMACLIPOutput(logits, weights, alone)

    def forward(self, images: torch.Tensor | None, text: torch.Tensor | None) -> CMACLIPOutput:
        return self.classify(*self.fuse(self.encode_tokens(images, text)))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by Algorithm 1's module: clip, sequence (CMA_SA), modality (CMA_MA), head (MLP)."""
        # logit_scale belongs to CLIP's contrastive loss, which CMA-CLIP does not use: it gets no gradient.
        clip = [p for n, p in self.towers.named_parameters() if not n.split(".")[-1].startswith("logit_")]
        groups = {
            "clip": clip,
            "sequence": list(self.sequence_attention.parameters()) if self.sequence_attention else [],
            "modality": list(self.modality_attention.parameters()),
            "head": list(self.heads.parameters()),
        }
        return groups


def create_model(config: CMACLIPConfig, *, load_pretrained: bool = True) -> CMACLIP:
    """The one factory: open_clip towers (pretrained weights if the config names them) + CMA modules."""
    return CMACLIP(config, create_clip(config.clip, load_pretrained=load_pretrained))
