"""Pooled keys and values beside or instead of the window: spatial_reduction, hilo, aggregated.

Every expected value comes from an independent computation written here (dense masked attention, the official
algorithm re-expressed step by step) or from the timm module with copied weights (float64, eval, randomised params).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo

from conftest import coords, create_random, dense_attention, heads_of, rand64

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


build = partial(create_random, weight_std=0.3, weight_seed=1234)  # the weights these oracles were tuned with


# ------------------------------------------------------------------------------------- spatial_reduction (PVT)


def _timm_pvt(ours, sr_ratio, linear):
    from timm.models.pvt_v2 import Attention

    ref = Attention(16, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear, qkv_bias=True).to(DT).eval()
    ref.fused_attn = False
    ref.load_state_dict(ours.state_dict())  # keys q, kv, sr, norm, proj
    return ref


@pytest.mark.parametrize(
    "size,sr_ratio,linear", [((8, 8), 2, False), ((9, 7), 2, False), ((10, 10), 1, True), ((13, 9), 1, True)]
)
def test_spatial_reduction_matches_timm(size, sr_ratio, linear):
    ours = build("spatial_reduction", 16, num_heads=2, sr_ratio=sr_ratio, linear=linear, mask_padding=False)
    ref = _timm_pvt(ours, sr_ratio, linear)
    x = rand64(2, *size, 16)
    expected = ref(x.reshape(2, -1, 16), list(size)).reshape(x.shape)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_spatial_reduction_ratio_one_is_mhsa():
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=1)
    x = rand64(2, 5, 6, 16)
    t = x.reshape(2, 30, 16)
    k, v = m.kv(t).chunk(2, dim=-1)
    out = dense_attention(heads_of(m.q(t), 2), heads_of(k, 2), heads_of(v, 2), scale=8**-0.5)
    torch.testing.assert_close(m(x), m.proj(out.reshape(2, 30, 16)).reshape(x.shape), **TOL)


@pytest.mark.parametrize(
    "size,sr_ratio,linear,mask_padding,keys",
    [
        ((9, 13), 4, False, True, (3, 4)),
        ((9, 13), 4, False, False, (2, 3)),
        ((9, 13), 1, True, True, (7, 7)),
        ((20, 11), 1, True, True, (7, 7)),
    ],
)
def test_spatial_reduction_key_count(size, sr_ratio, linear, mask_padding, keys):
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=sr_ratio, linear=linear, mask_padding=mask_padding)
    assert tuple(m.reduce(rand64(1, *size, 16)).shape) == (1, *keys, 16)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_spatial_reduction_border_tokens_reach_the_keys_only_when_padded(mask_padding):
    """9×7 with sr_ratio 4: the last row and last 3 columns fall outside timm's floor-sized reduction."""
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=4, mask_padding=mask_padding)
    x = rand64(1, 9, 7, 16).requires_grad_()
    m(x)[0, 0, 0].sum().backward()  # a query far from the border: the border reaches it only through the keys
    border = x.grad[0, 8, 6].abs().sum()
    assert (border > 0) == mask_padding


# --------------------------------------------------------------------------------------------- hilo (LITv2)


def hilo_reference(m, x, mask_padding=True):
    """LITv2 HiLo written densely: Hi-Fi = attention masked to same-window keys, Lo-Fi = attention to window means."""
    b, h, w, c = x.shape
    ws, d = m.window_size, m.head_dim
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    real = torch.zeros(hp, wp, dtype=torch.bool)
    real[:h, :w] = True
    ys, xs = coords(hp, wp).unbind(-1)
    window = (ys // ws) * (wp // ws) + xs // ws
    parts = []
    if m.h_heads:
        q, k, v = m.h_qkv(xp.reshape(b, -1, c)).chunk(3, dim=-1)
        allowed = window[:, None] == window[None, :]
        if mask_padding:
            allowed = allowed & real.reshape(-1)[None, :]
        out = dense_attention(
            heads_of(q, m.h_heads), heads_of(k, m.h_heads), heads_of(v, m.h_heads), scale=d**-0.5, allowed=allowed
        )
        parts.append(m.h_proj(out.reshape(b, hp, wp, -1))[:, :h, :w])
    if m.l_heads:
        counts = real.reshape(-1).to(x.dtype) if mask_padding else torch.ones(hp * wp, dtype=x.dtype)
        member = F.one_hot(window, (hp // ws) * (wp // ws)).to(x.dtype)  # [N, windows]
        pooled = torch.einsum("nm,bnc->bmc", member, xp.reshape(b, -1, c)) / (member * counts[:, None]).sum(0)[:, None]
        q = m.l_q(x.reshape(b, -1, c))
        k, v = m.l_kv(pooled).chunk(2, dim=-1)
        out = dense_attention(heads_of(q, m.l_heads), heads_of(k, m.l_heads), heads_of(v, m.l_heads), scale=d**-0.5)
        parts.append(m.l_proj(out.reshape(b, h, w, -1)))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize(
    "size,kwargs",
    [
        ((8, 8), dict(window_size=2, alpha=0.5)),
        ((7, 9), dict(window_size=2, alpha=0.5)),
        ((7, 9), dict(window_size=3, alpha=0.5, mask_padding=False)),
        ((6, 6), dict(window_size=2, alpha=0.0)),  # all heads Hi-Fi: window attention
        ((6, 6), dict(window_size=3, alpha=1.0)),  # all heads Lo-Fi: SRA with average pooling
        ((5, 6), dict(window_size=1, alpha=0.5)),  # window 1: plain MHSA on every head
    ],
)
def test_hilo_matches_dense_reference(size, kwargs):
    m = build("hilo", 16, num_heads=4, **kwargs)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), hilo_reference(m, x, kwargs.get("mask_padding", True)), **TOL)


def test_hilo_head_split_and_window_one_is_mhsa():
    assert (build("hilo", 16, num_heads=4, alpha=0.5).h_heads, build("hilo", 16, num_heads=4, alpha=0.9).l_heads) == (
        2,
        3,
    )
    m = build("hilo", 16, num_heads=4, window_size=1)
    assert m.l_heads == 4 and m.h_heads == 0
    x = rand64(1, 4, 5, 16)
    t = x.reshape(1, 20, 16)
    k, v = m.l_kv(t).chunk(2, -1)
    expected = m.l_proj(
        dense_attention(heads_of(m.l_q(t), 4), heads_of(k, 4), heads_of(v, 4), scale=4**-0.5).reshape(1, 20, 16)
    )
    torch.testing.assert_close(m(x), expected.reshape(x.shape), **TOL)


def test_hilo_hifi_channels_depend_only_on_their_window():
    m = build("hilo", 16, num_heads=4, window_size=2, alpha=0.5)
    x = rand64(1, 6, 6, 16)
    y = x.clone()
    y[0, 5, 5] += 1.0  # a token outside the window of (0, 0)
    a, b = m(x), m(y)
    hi = m.h_heads * m.head_dim
    torch.testing.assert_close(a[0, :2, :2, :hi], b[0, :2, :2, :hi], rtol=0, atol=0)
    assert not torch.allclose(a[0, 0, 0, hi:], b[0, 0, 0, hi:])


# --------------------------------------------------------------------------------------- aggregated (TransNeXt)


def adaptive_pool_centres(length: int, bins: int) -> torch.Tensor:
    starts = [(i * length) // bins for i in range(bins)]
    ends = [-((-(i + 1) * length) // bins) for i in range(bins)]
    return torch.tensor([(s + e - 1) / 2 for s, e in zip(starts, ends)], dtype=DT)


def aggregated_reference(m, x, pretrain):
    """TransNeXt AggregatedAttention densely, following the official forward without deduplication."""
    b, h, w, c = x.shape
    nh, d, k = m.num_heads, m.head_dim, m.kernel_size
    r, n = k // 2, h * w
    ph, pw = h // m.sr_ratio, w // m.sr_ratio
    ys, xs = coords(h, w).unbind(-1)
    # in-bounds window positions (brute force) and the length scale
    oy, ox = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    ky, kx = ys[:, None] + oy.reshape(-1), xs[:, None] + ox.reshape(-1)  # [N, k²]
    inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    scale = torch.log(inside.sum(-1).to(DT) + ph * pw)  # [N]
    t = x.reshape(b, n, c)
    qn = F.normalize(heads_of(m.q(t), nh), dim=-1)  # [b, N, h, d]
    q_hat = (qn + m.query_embedding.reshape(nh, d)) * F.softplus(m.temperature).reshape(nh, 1) * scale[:, None, None]
    key, value = m.kv(t).chunk(2, -1)
    key, value = F.normalize(heads_of(key, nh), dim=-1), heads_of(value, nh)
    flat = ky.clamp(0, h - 1) * w + kx.clamp(0, w - 1)  # [N, k²]
    k_loc = key[:, flat] * inside[None, :, :, None, None]
    v_loc = value[:, flat] * inside[None, :, :, None, None]  # zero padded values [b, N, k², h, d]
    a_loc = torch.einsum("bnhd,bnjhd->bhnj", q_hat, k_loc) + m.relative_pos_bias_local[:, None, :]
    a_loc = a_loc.masked_fill(~inside[None, None], float("-inf"))
    pooled = F.adaptive_avg_pool2d(F.gelu(m.sr(x.permute(0, 3, 1, 2))), (ph, pw)).flatten(2).transpose(1, 2)
    kp, vp = m.kv(m.norm(pooled)).chunk(2, -1)
    kp, vp = F.normalize(heads_of(kp, nh), dim=-1), heads_of(vp, nh)
    cy, cx = coords(ph, pw).unbind(-1)
    py, px = adaptive_pool_centres(h, ph)[cy], adaptive_pool_centres(w, pw)[cx]
    rel = torch.stack(
        [(ys[:, None] - py[None]) / (pretrain[0] - 1) * 8, (xs[:, None] - px[None]) / (pretrain[1] - 1) * 8], -1
    )
    rel = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
    cpb = m.cpb_fc2(torch.relu(m.cpb_fc1(rel))).permute(2, 0, 1)  # [h, N, P]
    a_pool = torch.einsum("bnhd,bmhd->bhnm", q_hat, kp) + cpb
    attn = torch.cat([a_loc, a_pool], -1).softmax(-1)
    alpha, beta = attn[..., : k * k], attn[..., k * k :]
    tokens = torch.einsum("bnhd,hdj->bhnj", qn, m.learnable_tokens) + m.learnable_bias
    out = torch.einsum("bhnj,bnjhd->bnhd", alpha + tokens, v_loc) + torch.einsum("bhnm,bmhd->bnhd", beta, vp)
    return m.proj(out.reshape(b, n, c)).reshape(x.shape)


@pytest.mark.parametrize("size,resolution", [((6, 6), (6, 6)), ((7, 5), (6, 6)), ((8, 10), (8, 10))])
def test_aggregated_matches_dense_reference(size, resolution):
    m = build("aggregated", 16, num_heads=2, kernel_size=3, sr_ratio=2, input_resolution=resolution)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), aggregated_reference(m, x, resolution), **TOL)


def test_aggregated_without_learnable_tokens_is_one_softmax_over_window_and_pool():
    m = build("aggregated", 16, num_heads=2, kernel_size=3, sr_ratio=2, input_resolution=(6, 8), pretrain_size=(10, 12))
    with torch.no_grad():
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
    x = rand64(1, 6, 8, 16)
    torch.testing.assert_close(m(x), aggregated_reference(m, x, (10, 12)), **TOL)


def test_aggregated_window_counts_9_6_4():
    m = attnzoo.create("aggregated", 16, num_heads=2, kernel_size=3, sr_ratio=2, input_resolution=(6, 6))
    n = torch.exp(m.geometry((6, 6)).log_length) - 9  # P = 3·3 pooled tokens
    torch.testing.assert_close(n[1:-1, 1:-1], torch.full((4, 4), 9.0, dtype=DT), rtol=0, atol=1e-5)
    for corner in (n[0, 0], n[0, -1], n[-1, 0], n[-1, -1]):
        assert abs(corner - 4) < 1e-5
    torch.testing.assert_close(torch.cat([n[0, 1:-1], n[1:-1, 0]]), torch.full((8,), 6.0, dtype=DT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["q", "k"])
def test_aggregated_is_invariant_to_query_and_key_scale(which):
    m = build("aggregated", 16, num_heads=2, kernel_size=3, sr_ratio=2, input_resolution=(6, 6))
    x = rand64(1, 6, 6, 16)
    before = m(x)
    with torch.no_grad():
        if which == "q":
            m.q.weight.mul_(3.0)
            m.q.bias.mul_(3.0)
        else:  # the K rows of the shared kv projection
            m.kv.weight[:16].mul_(0.25)
            m.kv.bias[:16].mul_(0.25)
    torch.testing.assert_close(m(x), before, **TOL)


def test_aggregated_rejects_even_kernel_and_small_maps():
    with pytest.raises(ValueError, match="kernel_size=4"):
        attnzoo.create("aggregated", 16, num_heads=2, kernel_size=4, input_resolution=(8, 8))
    m = attnzoo.create("aggregated", 16, num_heads=2, sr_ratio=4, input_resolution=(8, 8))
    with pytest.raises(ValueError, match="sr_ratio=4"):
        m(torch.randn(1, 3, 8, 16))
