"""Global non-local attentions without softmax or with a shortcut: non_local, sparse_global.

References are timm's NonLocalAttn with copied weights and the official definition written out here; float64,
eval mode, every parameter randomised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import changed_positions, create_random, rand64

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


# ---------------------------------------------------------------------------------------------------- non_local


@pytest.mark.parametrize("train", [False, True])
def test_non_local_matches_timm_non_local_attn_minus_its_shortcut(train):
    from timm.layers import NonLocalAttn

    ours = create_random("non_local", 16, reduction=2)
    ref = NonLocalAttn(16, rd_channels=8).to(DT)
    state = {
        k: (v[..., None, None] if k[0] in "tpgz" and k.endswith("weight") else v) for k, v in ours.state_dict().items()
    }
    ref.load_state_dict(state)
    ours.train(train)
    ref.train(train)
    x = rand64(2, 5, 6, 16)
    expected = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x
    torch.testing.assert_close(ours(x), expected, **TOL)


# ---------------------------------------------------------------------------------------------------- sparse_global


def sparse_gsa_oracle(m, x, activation):
    """DLGSANet's SparseAttention / Restormer's MDTA (no TLC), written per head in NCHW."""
    b, h, w, c = x.shape
    qkv = m.qkv_dwconv(m.qkv(x.permute(0, 3, 1, 2)))
    q, k, v = qkv.chunk(3, dim=1)
    d = c // m.num_heads
    outs = []
    for head in range(m.num_heads):
        sl = slice(head * d, (head + 1) * d)
        qh, kh, vh = (t[:, sl].reshape(b, d, h * w) for t in (q, k, v))
        qh = qh / qh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kh = kh / kh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        logits = qh @ kh.transpose(1, 2) * m.temperature[head]
        weights = torch.relu(logits) if activation == "relu" else torch.softmax(logits, -1)
        outs.append((weights @ vh).reshape(b, d, h, w))
    return m.project_out(torch.cat(outs, 1)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_sparse_global_matches_the_official_definition(activation):
    ours = create_random("sparse_global", 16, num_heads=2, activation=activation, bias=True)
    x = rand64(2, 5, 7, 16)
    torch.testing.assert_close(ours(x), sparse_gsa_oracle(ours, x, activation), **TOL)


def test_sparse_global_is_global_and_relu_drops_anticorrelated_channels():
    ours = create_random("sparse_global", 16, num_heads=2)
    x = rand64(1, 6, 6, 16)
    assert changed_positions(ours, x, (5, 5)).all()
    with torch.no_grad():
        ours.temperature.fill_(-1e3)  # flips the sign: only anti-correlated channel pairs keep a weight
    qkv = ours.qkv_dwconv(ours.qkv(x.permute(0, 3, 1, 2)))
    q = F.normalize(qkv[:, :16].reshape(1, 2, 8, 36), dim=-1)
    k = F.normalize(qkv[:, 16:32].reshape(1, 2, 8, 36), dim=-1)
    kept = (q @ k.transpose(-1, -2) * -1e3) > 0
    assert 0 < kept.float().mean() < 1  # a sparse map: some weights are exactly zero
    torch.testing.assert_close(ours(x), sparse_gsa_oracle(ours, x, "relu"), **TOL)
