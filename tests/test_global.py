"""Global, head-mixing and cross-attention mechanisms: parity with timm / torch references and paper properties.

Parity protocol (shared/mechanisms.md): float64, eval mode, every parameter and BN statistic randomised, timm
``fused_attn = False``, explicit key maps, tolerance 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.mhsa import MultiHeadSelfAttention

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def randomise(module: nn.Module, scale: float = 0.5) -> nn.Module:
    """Every parameter and BN running statistic set to random values (references are vacuous at init)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return module


def copy_params(target: nn.Module, mapping: dict[str, torch.Tensor]) -> None:
    """Load ``mapping`` (our key → tensor) into ``target``; every parameter and buffer of ``target`` must be named."""
    state = target.state_dict()
    assert set(mapping) == set(state), (set(state) ^ set(mapping))
    target.load_state_dict({k: v.reshape(state[k].shape).clone() for k, v in mapping.items()})


def make(name: str, dim: int, **kwargs) -> nn.Module:
    return attnzoo.create(name, dim, **kwargs).to(DT).eval()


# --------------------------------------------------------------------------------------------------------- mhsa


def test_mhsa_matches_timm_attention():
    from timm.layers import Attention

    ref = randomise(Attention(24, num_heads=3, qkv_bias=True).to(DT)).eval()
    ref.fused_attn = False
    ours = make("mhsa", 24, num_heads=3)
    copy_params(ours, {"qkv.weight": ref.qkv.weight, "qkv.bias": ref.qkv.bias,
                       "proj.weight": ref.proj.weight, "proj.bias": ref.proj.bias})  # fmt: skip
    x = torch.randn(2, 11, 24, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_mhsa_matches_torch_multihead_attention_and_causal_mask():
    ref = randomise(nn.MultiheadAttention(16, 4, batch_first=True).to(DT)).eval()
    ours = make("mhsa", 16, num_heads=4)
    copy_params(ours, {"qkv.weight": ref.in_proj_weight, "qkv.bias": ref.in_proj_bias,
                       "proj.weight": ref.out_proj.weight, "proj.bias": ref.out_proj.bias})  # fmt: skip
    x = torch.randn(2, 9, 16, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], **TOL)
    causal = nn.Transformer.generate_square_subsequent_mask(9, dtype=DT)
    expected = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(ours(x, attn_mask=causal), expected, **TOL)
    ours.is_causal = True
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_mhsa_flattens_spatial_input_row_major_and_is_permutation_equivariant():
    m = randomise(make("mhsa", 16, num_heads=2))
    x = torch.randn(2, 3, 5, 16, dtype=DT)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(2, 15, 16), m(x.reshape(2, 15, 16)), **TOL)
    perm = torch.randperm(15)
    seq = x.reshape(2, 15, 16)
    torch.testing.assert_close(m(seq[:, perm]), m(seq)[:, perm], **TOL)


def test_mhsa_rejects_wrong_channel_count():
    m = make("mhsa", 16, num_heads=2)
    with pytest.raises(ValueError, match="dim=16"):
        m(torch.randn(1, 4, 8, dtype=DT))
    with pytest.raises(ValueError, match="num_heads=3"):
        attnzoo.create("mhsa", 16, num_heads=3)
