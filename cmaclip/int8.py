"""int8 weights for inference on x86 CPUs without native bf16 (AVX2 only, or AVX-512 without BF16): every
matmul of the CLIP towers and the sequence attention runs as a dynamically quantized int8 linear (weights
int8 per output channel, activations quantized per batch), the rest stays fp32.

Kept out: the modality attention and heads (they cost nothing and make the decision), the patch embedding
(a convolution), the layer norms and the projections into the joint space (parameters, not modules).
`nn.MultiheadAttention` keeps its in-projection as a bare parameter, so `Int8Attention` takes its place:
the same self-attention with both projections in int8 and torch's fused attention between them.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """An `nn.Linear` with int8 weights, for inference: y = x W^T + b with W quantized symmetrically per
    output row and x quantized per call, on torch's x86 quantized engine (fbgemm; oneDNN where it is faster,
    e.g. with AMX)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.14 deprecates quantized tensors in favour of torchao (not a dependency); fbgemm's
            # packed weights still need one, and a scoring log cannot act on the warning.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # open_clip reads a block's weight dtype from `mlp.c_fc` to cast its inputs; this says fp32.
        self.int8_original_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so AVX2's int16 pair sums (vpmaddubsw) cannot saturate.
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) or an additive one -> additive, in `dtype`."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class Int8Attention(nn.Module):
    """`nn.MultiheadAttention`'s self-attention (query is key is value, as open_clip's blocks and
    `nn.TransformerEncoderLayer` call it) with int8 in- and out-projections, in the layout it replaces
    ([L, B, D] unless `batch_first`). Returns (output, None)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.in_proj_bias is None:
            raise TypeError("Int8Attention takes a self-attention with one biased in-projection")
        projection = nn.Linear(attention.embed_dim, 3 * attention.embed_dim)
        projection.weight, projection.bias = attention.in_proj_weight, attention.in_proj_bias
        self.in_proj, self.out_proj = Int8Linear(projection), Int8Linear(attention.out_proj)
        self.num_heads, self.batch_first = attention.num_heads, attention.batch_first
        # nn.TransformerEncoderLayer takes its fused fp32 kernel (which reads the fp32 weights this module
        # no longer has) unless in_proj_bias is None: None sends it through the modules, in either layout.
        self.in_proj_bias, self._qkv_same_embed_dim = None, True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query or need_weights:
            raise NotImplementedError("Int8Attention is self-attention without attention weights")
        b, length = (query.shape[0], query.shape[1]) if self.batch_first else (query.shape[1], query.shape[0])
        qkv = self.in_proj(query).unflatten(-1, (3, self.num_heads, -1))
        q, k, v = qkv.permute(2, 0, 3, 1, 4) if self.batch_first else qkv.permute(2, 1, 3, 0, 4)  # [B, H, L, d]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # [B * H, L, L]
            mask = mask.view(b, self.num_heads, length, length)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = out.transpose(1, 2) if self.batch_first else out.permute(2, 0, 1, 3)
        return self.out_proj(out.flatten(-2)), None


def quantize(module: nn.Module) -> nn.Module:
    """In place: each `nn.Linear` and self-attention under `module` -> its int8 form. Returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, Int8Attention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize(child)
    return module


def quantize_model(model: nn.Module) -> nn.Module:
    """A CMACLIP model's CLIP towers and sequence attention (~all its FLOPs) in int8, in place; its modality
    attention and heads stay as they are. Returns `model`."""
    quantize(model.towers)
    if model.sequence_attention is not None:
        quantize(model.sequence_attention)
    return model
