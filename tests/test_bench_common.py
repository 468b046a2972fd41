"""The benchmarks' shared measures (bench/common.py) count what they claim to."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import flops_per_sample  # noqa: E402


def test_a_scoring_transformer_encoder_is_counted_whole() -> None:
    """In eval mode under inference_mode, PyTorch runs an encoder layer as one fused kernel that the FLOP
    counter does not see; the count must not depend on it (the fast path is left as it was found)."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    tokens = torch.randn(3, 10, 32)
    encoder.eval()
    with_grad = flops_per_sample(lambda: encoder(tokens), 3)   # autograd on: never the fused kernel
    with torch.inference_mode():
        scoring = flops_per_sample(lambda: encoder(tokens), 3)
    assert with_grad > 0 and scoring == with_grad
    assert torch.backends.mha.get_fastpath_enabled()
