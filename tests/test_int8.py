"""int8 weights (cmaclip.int8): each replaced module computes what it replaces, within int8's rounding, in
every layout and with every mask its callers pass; a quantized model keeps open_clip's dtype lookup working.
The top-1 agreement of a trained model with fp32 is in test_scoring.py (test_int8_top1_agrees_with_fp32)."""
import pytest
import torch
from torch import nn

from cmaclip import precision
from cmaclip.int8 import Int8Attention, Int8Linear, quantize_model
from tiny_training import one_thread, tiny_config, tiny_model  # noqa: F401

pytestmark = pytest.mark.skipif(not precision.cpu_supports_int8(), reason="no fbgemm int8 kernels (not x86)")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_int8_linear_is_the_linear_within_int8_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.randn(4, 50, 96)
    with torch.inference_mode():
        want, got = linear(x), Int8Linear(linear)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert 0 < relative_error(got, want) < 0.02  # quantized (not the fp32 kernel), and close


def _causal(length: int) -> torch.Tensor:
    """open_clip's text mask: additive, -inf above the diagonal."""
    return torch.full((length, length), float("-inf")).triu_(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal", "padding", "padding_additive", "causal_and_padding"])
def test_int8_attention_is_multihead_attention_within_int8_rounding(batch_first, masks):
    torch.manual_seed(0)
    batch, length, width = 3, 12, 64
    attention = nn.MultiheadAttention(width, 4, batch_first=batch_first).eval()
    x = torch.randn(batch, length, width) if batch_first else torch.randn(length, batch, width)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, 7:], padding[2, 3:] = True, True  # key positions past each title's end
    additive = torch.zeros(padding.shape).masked_fill(padding, -torch.inf)
    kwargs = {"attn_mask": _causal(length) if masks.startswith("causal") else None,
              "key_padding_mask": {"padding": padding, "padding_additive": additive,
                                   "causal_and_padding": additive}.get(masks)}
    with torch.inference_mode():
        want = attention(x, x, x, need_weights=False, **kwargs)[0]
        got, weights = Int8Attention(attention)(x, x, x, need_weights=False, **kwargs)
    assert weights is None and got.shape == want.shape
    assert relative_error(got, want) < 0.06  # int8 rounding: ~0.03; a mask left out: 0.7-0.9


def test_int8_sequence_attention_takes_the_modules_path_in_either_layout():
    """nn.TransformerEncoderLayer's fused inference kernel reads fp32 weights; an int8 layer must not take it."""
    torch.manual_seed(0)
    model = tiny_model(tiny_config()).eval()
    tokens = torch.randn(2, 9, model.towers.embed_dim)
    padding = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    with torch.inference_mode():
        want = model.sequence_attention(tokens, padding)
        quantize_model(model)
        for sequence_first in (False, True):
            model.sequence_attention.set_sequence_first(sequence_first)
            got = model.sequence_attention(tokens, padding)
            assert relative_error(got, want) < 0.05


def test_quantized_model_keeps_open_clips_dtype_lookup_and_its_heads():
    torch.manual_seed(0)
    model = tiny_model(tiny_config()).eval()
    quantize_model(model)
    blocks = [*model.towers.clip.visual.transformer.resblocks, *model.towers.clip.transformer.resblocks]
    assert all(isinstance(b.mlp.c_fc, Int8Linear) and isinstance(b.attn, Int8Attention) for b in blocks)
    assert model.towers.text.transformer.get_cast_dtype() == torch.float32  # reads mlp.c_fc
    assert not any(isinstance(m, (Int8Linear, Int8Attention))
                   for m in [*model.heads.modules(), *model.modality_attention.modules()])
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 8)))
    assert all(torch.isfinite(v).all() for v in out.logits.values())
