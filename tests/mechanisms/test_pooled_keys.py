"""Parity and paper properties of long_short_distance, outlook, overlapping_cross, aggregated, spatial_reduction, hilo.

Every expected value comes from an independent computation written here (dense masked attention, the official
algorithm re-expressed step by step) or from the timm module with copied weights (float64, eval, randomised params).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def build(name: str, dim: int = 16, **kwargs) -> torch.nn.Module:
    m = attnzoo.create(name, dim, **kwargs).to(DT).eval()
    randomise(m)
    return m


def randomise(m: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return m


def rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def dense(q, k, v, scale, bias=None, allowed=None):
    """Softmax attention over flattened tokens. q [B,N,h,d], k/v [B,M,h,d]; bias [h,N,M] or [B,h,N,M]; allowed [N,M]."""
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], h, t.shape[-1] // h)


def grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)


# ---------------------------------------------------------------------------------------------- outlook (VOLO)


@pytest.mark.parametrize("size,kernel,padding,stride", [((7, 9), 3, 1, 1), ((8, 8), 3, 1, 2), ((7, 7), 3, 1, 2)])
def test_outlook_matches_timm(size, kernel, padding, stride):
    from timm.models.volo import OutlookAttention

    ours = build("outlook", 16, num_heads=2, kernel_size=kernel, padding=padding, stride=stride)
    ref = OutlookAttention(16, num_heads=2, kernel_size=kernel, padding=padding, stride=stride).to(DT).eval()
    ref.load_state_dict(ours.state_dict())  # keys v, attn, proj
    x = rand(2, *size, 16)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_outlook_kernel_one_is_projected_values():
    m = build("outlook", 16, num_heads=2, kernel_size=1, padding=0)
    x = rand(2, 5, 6, 16)
    torch.testing.assert_close(m(x), m.proj(m.v(x)), **TOL)


def test_outlook_output_depends_on_a_2k_minus_1_neighbourhood():
    m = build("outlook", 8, num_heads=2, kernel_size=3, padding=1)
    x = rand(1, 9, 9, 8).requires_grad_()
    m(x)[0, 4, 4].sum().backward()
    support = x.grad[0].abs().sum(-1) > 0
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    expected = ((ys - 4).abs() <= 2) & ((xs - 4).abs() <= 2)
    assert torch.equal(support, expected)


def test_outlook_rejects_inconsistent_geometry():
    m = attnzoo.create("outlook", 16, num_heads=2, kernel_size=3, padding=0, stride=1)
    with pytest.raises(ValueError, match="kernel_size=3"):
        m(torch.randn(1, 6, 6, 16))


# ------------------------------------------------------------------------------------- spatial_reduction (PVT)


def _timm_pvt(ours, sr_ratio, linear):
    from timm.models.pvt_v2 import Attention

    ref = Attention(16, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear, qkv_bias=True).to(DT).eval()
    ref.fused_attn = False
    ref.load_state_dict(ours.state_dict())  # keys q, kv, sr, norm, proj
    return ref


@pytest.mark.parametrize("size,sr_ratio,linear", [((8, 8), 2, False), ((9, 7), 2, False), ((10, 10), 1, True), ((13, 9), 1, True)])
def test_spatial_reduction_matches_timm(size, sr_ratio, linear):
    ours = build("spatial_reduction", 16, num_heads=2, sr_ratio=sr_ratio, linear=linear, mask_padding=False)
    ref = _timm_pvt(ours, sr_ratio, linear)
    x = rand(2, *size, 16)
    expected = ref(x.reshape(2, -1, 16), list(size)).reshape(x.shape)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_spatial_reduction_ratio_one_is_mhsa():
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=1)
    x = rand(2, 5, 6, 16)
    t = x.reshape(2, 30, 16)
    k, v = m.kv(t).chunk(2, dim=-1)
    out = dense(heads(m.q(t), 2), heads(k, 2), heads(v, 2), 8**-0.5)
    torch.testing.assert_close(m(x), m.proj(out.reshape(2, 30, 16)).reshape(x.shape), **TOL)


@pytest.mark.parametrize(
    "size,sr_ratio,linear,mask_padding,keys",
    [((9, 13), 4, False, True, (3, 4)), ((9, 13), 4, False, False, (2, 3)), ((9, 13), 1, True, True, (7, 7)),
     ((20, 11), 1, True, True, (7, 7))],
)  # fmt: skip
def test_spatial_reduction_key_count(size, sr_ratio, linear, mask_padding, keys):
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=sr_ratio, linear=linear, mask_padding=mask_padding)
    assert tuple(m.reduce(rand(1, *size, 16)).shape) == (1, *keys, 16)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_spatial_reduction_border_tokens_reach_the_keys_only_when_padded(mask_padding):
    """9×7 with sr_ratio 4: the last row and last 3 columns fall outside timm's floor-sized reduction."""
    m = build("spatial_reduction", 16, num_heads=2, sr_ratio=4, mask_padding=mask_padding)
    x = rand(1, 9, 7, 16).requires_grad_()
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
    ys, xs = grid(hp, wp)
    window = (ys // ws) * (wp // ws) + xs // ws
    parts = []
    if m.h_heads:
        q, k, v = m.h_qkv(xp.reshape(b, -1, c)).chunk(3, dim=-1)
        allowed = window[:, None] == window[None, :]
        if mask_padding:
            allowed = allowed & real.reshape(-1)[None, :]
        out = dense(heads(q, m.h_heads), heads(k, m.h_heads), heads(v, m.h_heads), d**-0.5, allowed=allowed)
        parts.append(m.h_proj(out.reshape(b, hp, wp, -1))[:, :h, :w])
    if m.l_heads:
        counts = real.reshape(-1).to(x.dtype) if mask_padding else torch.ones(hp * wp, dtype=x.dtype)
        member = F.one_hot(window, (hp // ws) * (wp // ws)).to(x.dtype)  # [N, windows]
        pooled = torch.einsum("nm,bnc->bmc", member, xp.reshape(b, -1, c)) / (member * counts[:, None]).sum(0)[:, None]
        q = m.l_q(x.reshape(b, -1, c))
        k, v = m.l_kv(pooled).chunk(2, dim=-1)
        out = dense(heads(q, m.l_heads), heads(k, m.l_heads), heads(v, m.l_heads), d**-0.5)
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
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), hilo_reference(m, x, kwargs.get("mask_padding", True)), **TOL)


def test_hilo_head_split_and_window_one_is_mhsa():
    assert (build("hilo", 16, num_heads=4, alpha=0.5).h_heads, build("hilo", 16, num_heads=4, alpha=0.9).l_heads) == (2, 3)
    m = build("hilo", 16, num_heads=4, window_size=1)
    assert m.l_heads == 4 and m.h_heads == 0
    x = rand(1, 4, 5, 16)
    t = x.reshape(1, 20, 16)
    k, v = m.l_kv(t).chunk(2, -1)
    expected = m.l_proj(dense(heads(m.l_q(t), 4), heads(k, 4), heads(v, 4), 4**-0.5).reshape(1, 20, 16))
    torch.testing.assert_close(m(x), expected.reshape(x.shape), **TOL)


def test_hilo_hifi_channels_depend_only_on_their_window():
    m = build("hilo", 16, num_heads=4, window_size=2, alpha=0.5)
    x = rand(1, 6, 6, 16)
    y = x.clone()
    y[0, 5, 5] += 1.0  # a token outside the window of (0, 0)
    a, b = m(x), m(y)
    hi = m.h_heads * m.head_dim
    torch.testing.assert_close(a[0, :2, :2, :hi], b[0, :2, :2, :hi], rtol=0, atol=0)
    assert not torch.allclose(a[0, 0, 0, hi:], b[0, 0, 0, hi:])


# ------------------------------------------------------------------------------ long_short_distance (CrossFormer)


def lsda_reference(m, x, group, interval, mask_padding=True):
    """CrossFormer LSDA densely: keys restricted to the query's group, DPB at Δ = query − key in group coordinates."""
    b, h, w, c = x.shape
    hp, wp = (math.ceil(s / (group * i)) * group * i for s, i in zip((h, w), interval))
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    ys, xs = grid(hp, wp)
    iy, ix = hp // group, wp // group
    if interval == (1, 1):  # short: adjacent G×G groups
        gid, cy, cx = (ys // group) * wp + xs // group, ys % group, xs % group
    else:  # long: tokens at interval I = Hp/G
        gid, cy, cx = (ys % iy) * wp + xs % ix, ys // iy, xs // ix
    allowed = gid[:, None] == gid[None, :]
    if mask_padding:
        allowed = allowed & ((ys < h) & (xs < w))[None, :]
    delta = torch.stack([cy[:, None] - cy[None, :], cx[:, None] - cx[None, :]], dim=-1).to(x.dtype)
    bias = m.pos(delta).permute(2, 0, 1)  # the DPB MLP evaluated at each pair's offset
    q, k, v = m.qkv(xp.reshape(b, -1, c)).chunk(3, dim=-1)
    nh = m.num_heads
    out = dense(heads(q, nh), heads(k, nh), heads(v, nh), m.head_dim**-0.5, bias=bias, allowed=allowed)
    return m.proj(out.reshape(b, hp, wp, c))[:, :h, :w]


@pytest.mark.parametrize(
    "size,mode,expected_geometry",
    [
        ((8, 8), "short", (4, (1, 1))),
        ((8, 8), "long", (4, (2, 2))),
        ((9, 10), "short", (4, (1, 1))),
        ((9, 10), "long", (4, (3, 3))),
        ((12, 8), "long", (4, (3, 2))),
        ((4, 4), "long", (4, (1, 1))),  # G = H = W: one group, global attention + DPB
        ((3, 7), "long", (3, (1, 1))),  # min(H, W) <= G: SDA with G = min(H, W)
    ],
)
def test_long_short_distance_matches_dense_groups(size, mode, expected_geometry):
    m = build("long_short_distance", 32, num_heads=2, group_size=4, mode=mode)
    assert m.geometry(size) == expected_geometry
    x = rand(2, *size, 32)
    torch.testing.assert_close(m(x), lsda_reference(m, x, *expected_geometry), **TOL)


def test_long_short_distance_unmasked_padding_and_global_equivalence():
    m = build("long_short_distance", 32, num_heads=2, group_size=4, mode="short", mask_padding=False)
    x = rand(1, 6, 7, 32)
    torch.testing.assert_close(m(x), lsda_reference(m, x, 4, (1, 1), mask_padding=False), **TOL)
    # G = H = W: short and long both equal global attention + DPB
    short = build("long_short_distance", 32, num_heads=2, group_size=5, mode="short")
    long = build("long_short_distance", 32, num_heads=2, group_size=5, mode="long")
    x = rand(1, 5, 5, 32)
    torch.testing.assert_close(short(x), long(x), **TOL)


def test_long_short_distance_dpb_shape_and_group_size_independence():
    m = build("long_short_distance", 32, num_heads=2, group_size=4)
    assert m.pos.pos_proj.weight.shape == (2, 2)  # D = C/16, CrossFormer's DynamicPosBias(dim // 4) with pos_dim // 4
    other = attnzoo.create("long_short_distance", 32, num_heads=2, group_size=7)
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------------- overlapping_cross (HAT OCA)


def hat_rpi(ws: int, ows: int) -> torch.Tensor:
    """HAT.calculate_rpi_oca, step by step (negative entries are left for tensor indexing to wrap)."""
    co = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    ce = torch.stack(torch.meshgrid(torch.arange(ows), torch.arange(ows), indexing="ij")).flatten(1)
    rel = (ce[:, None, :] - co[:, :, None]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - ows + 1
    rel[:, :, 1] += ws - ows + 1
    rel[:, :, 0] *= ws + ows - 1
    return rel.sum(-1)


def oca_reference(m, x):
    """HAT OCAB's attention path (no norm / residual / MLP) on a map whose extents are multiples of M."""
    b, h, w, c = x.shape
    ws, ows, nh = m.window_size, m.overlap_win_size, m.num_heads
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    qw = q.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, nh, c // nh)
    kv = torch.cat([k, v], dim=-1).permute(0, 3, 1, 2)
    kv = F.unfold(kv, ows, stride=ws, padding=(ows - ws) // 2)  # [b, 2c·ows², windows]
    kv = kv.reshape(b, 2, c, ows * ows, -1).permute(1, 0, 4, 3, 2).reshape(2, -1, ows * ows, nh, c // nh)
    bias = torch.zeros(nh, ws * ws, ows * ows, dtype=x.dtype)
    if m.relative_position_bias_table is not None:
        bias = m.relative_position_bias_table[hat_rpi(ws, ows).view(-1)].view(ws * ws, ows * ows, -1).permute(2, 0, 1)
    out = dense(qw, kv[0], kv[1], (c // nh) ** -0.5, bias=bias)
    out = out.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    return m.proj(out)


def test_hat_index_wraps_negative_and_is_a_bijection():
    rpi = hat_rpi(4, 6)
    assert rpi.min() < 0  # HAT relies on the wrap
    assert torch.equal(torch.unique(rpi % 81), torch.arange(81))
    # the module's per-offset engine index picks HAT's (wrapped) table row for every (query, key) pair
    for ws, ratio in ((4, 0.5), (3, 0.7)):
        m = attnzoo.create("overlapping_cross", 16, num_heads=2, window_size=ws, overlap_ratio=ratio)
        ows = m.overlap_win_size
        side, halo = ws + ows - 1, (ows - ws) // 2
        qy, qx = grid(ws, ws)
        ky, kx = grid(ows, ows)
        dy = ky[None, :] - halo - qy[:, None] + ows - 1  # pixel offset key − query, shifted to the engine index
        dx = kx[None, :] - halo - qx[:, None] + ows - 1
        assert torch.equal(m.engine_index[dy, dx], hat_rpi(ws, ows) % (side * side))


@pytest.mark.parametrize("size,ws,ratio", [((8, 8), 4, 0.5), ((12, 8), 4, 0.5), ((6, 9), 3, 0.7), ((8, 12), 4, 0.0)])
def test_overlapping_cross_matches_hat_oca(size, ws, ratio):
    m = build("overlapping_cross", 16, num_heads=2, window_size=ws, overlap_ratio=ratio)
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), oca_reference(m, x), **TOL)


def test_overlapping_cross_without_bias_and_unmasked_padding():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5, rel_pos_bias=False)
    x = rand(1, 8, 4, 16)
    torch.testing.assert_close(m(x), oca_reference(m, x), **TOL)
    # mask_padding=False: a 7×6 map behaves as HAT on the zero-padded 8×8 map, cropped
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5, mask_padding=False)
    x = rand(1, 7, 6, 16)
    padded = F.pad(x, (0, 0, 0, 2, 0, 1))
    torch.testing.assert_close(m(x), oca_reference(m, padded)[:, :7, :6], **TOL)


def test_overlapping_cross_ratio_zero_is_window_attention_with_key_minus_query_table():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.0)
    x = rand(1, 8, 8, 16)
    ys, xs = grid(8, 8)
    allowed = ((ys // 4)[:, None] == (ys // 4)[None, :]) & ((xs // 4)[:, None] == (xs // 4)[None, :])
    dy, dx = ys[None, :] % 4 - ys[:, None] % 4, xs[None, :] % 4 - xs[:, None] % 4  # key − query in the window
    index = ((dy + 1) * 7 + dx + 1) % 49  # HAT with M_o = M: row = Δ + 1
    bias = m.relative_position_bias_table[index].permute(2, 0, 1)
    q, k, v = m.qkv(x.reshape(1, 64, 16)).chunk(3, -1)
    out = dense(heads(q, 2), heads(k, 2), heads(v, 2), 8**-0.5, bias=bias, allowed=allowed)
    torch.testing.assert_close(m(x), m.proj(out.reshape(1, 64, 16)).reshape(x.shape), **TOL)


def test_overlapping_cross_window_depends_only_on_its_extended_region():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5)  # M_o = 6, halo 1
    x = rand(1, 12, 12, 16)
    inside, outside = x.clone(), x.clone()
    inside[0, 8, 5] += 1.0  # row 8 is in the halo of window rows 4..7
    outside[0, 9, 5] += 1.0
    base = m(x)[0, 4:8, 4:8]
    torch.testing.assert_close(m(outside)[0, 4:8, 4:8], base, rtol=0, atol=0)
    assert not torch.allclose(m(inside)[0, 4:8, 4:8], base)


def test_overlapping_cross_rejects_odd_overlap():
    with pytest.raises(ValueError, match="overlap_ratio"):
        attnzoo.create("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.25)


# --------------------------------------------------------------------------------------- aggregated (TransNeXt)


def adaptive_pool_centres(length: int, bins: int) -> torch.Tensor:
    starts = [(i * length) // bins for i in range(bins)]
    ends = [-((-(i + 1) * length) // bins) for i in range(bins)]
    return torch.tensor([(s + e - 1) / 2 for s, e in zip(starts, ends)], dtype=DT)


def aggregated_reference(m, x, pretrain):
    """TransNeXt AggregatedAttention densely, following the official forward without deduplication."""
    b, h, w, c = x.shape
    nh, d, k = m.num_heads, m.head_dim, m.window_size
    r, n = k // 2, h * w
    ph, pw = h // m.sr_ratio, w // m.sr_ratio
    ys, xs = grid(h, w)
    # in-bounds window positions (brute force) and the length scale
    oy, ox = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    ky, kx = ys[:, None] + oy.reshape(-1), xs[:, None] + ox.reshape(-1)  # [N, k²]
    inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    scale = torch.log(inside.sum(-1).to(DT) + ph * pw)  # [N]
    t = x.reshape(b, n, c)
    qn = F.normalize(heads(m.q(t), nh), dim=-1)  # [b, N, h, d]
    q_hat = (qn + m.query_embedding.reshape(nh, d)) * F.softplus(m.temperature).reshape(nh, 1) * scale[:, None, None]
    key, value = m.kv(t).chunk(2, -1)
    key, value = F.normalize(heads(key, nh), dim=-1), heads(value, nh)
    flat = (ky.clamp(0, h - 1) * w + kx.clamp(0, w - 1))  # [N, k²]
    k_loc = key[:, flat] * inside[None, :, :, None, None]
    v_loc = value[:, flat] * inside[None, :, :, None, None]  # zero padded values [b, N, k², h, d]
    a_loc = torch.einsum("bnhd,bnjhd->bhnj", q_hat, k_loc) + m.relative_pos_bias_local[:, None, :]
    a_loc = a_loc.masked_fill(~inside[None, None], float("-inf"))
    pooled = F.adaptive_avg_pool2d(F.gelu(m.sr(x.permute(0, 3, 1, 2))), (ph, pw)).flatten(2).transpose(1, 2)
    kp, vp = m.kv(m.norm(pooled)).chunk(2, -1)
    kp, vp = F.normalize(heads(kp, nh), dim=-1), heads(vp, nh)
    cy, cx = grid(ph, pw)
    py, px = adaptive_pool_centres(h, ph)[cy], adaptive_pool_centres(w, pw)[cx]
    rel = torch.stack([(ys[:, None] - py[None]) / (pretrain[0] - 1) * 8, (xs[:, None] - px[None]) / (pretrain[1] - 1) * 8], -1)
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
    m = build("aggregated", 16, num_heads=2, window_size=3, sr_ratio=2, input_resolution=resolution)
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), aggregated_reference(m, x, resolution), **TOL)


def test_aggregated_without_learnable_tokens_is_one_softmax_over_window_and_pool():
    m = build("aggregated", 16, num_heads=2, window_size=3, sr_ratio=2, input_resolution=(6, 8), pretrain_size=(10, 12))
    with torch.no_grad():
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
    x = rand(1, 6, 8, 16)
    torch.testing.assert_close(m(x), aggregated_reference(m, x, (10, 12)), **TOL)


def test_aggregated_window_counts_9_6_4():
    m = attnzoo.create("aggregated", 16, num_heads=2, window_size=3, sr_ratio=2, input_resolution=(6, 6))
    n = torch.exp(m.geometry((6, 6)).log_length) - 9  # P = 3·3 pooled tokens
    torch.testing.assert_close(n[1:-1, 1:-1], torch.full((4, 4), 9.0, dtype=DT), rtol=0, atol=1e-5)
    for corner in (n[0, 0], n[0, -1], n[-1, 0], n[-1, -1]):
        assert abs(corner - 4) < 1e-5
    torch.testing.assert_close(torch.cat([n[0, 1:-1], n[1:-1, 0]]), torch.full((8,), 6.0, dtype=DT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["q", "k"])
def test_aggregated_is_invariant_to_query_and_key_scale(which):
    m = build("aggregated", 16, num_heads=2, window_size=3, sr_ratio=2, input_resolution=(6, 6))
    x = rand(1, 6, 6, 16)
    before = m(x)
    with torch.no_grad():
        if which == "q":
            m.q.weight.mul_(3.0)
            m.q.bias.mul_(3.0)
        else:  # the K rows of the shared kv projection
            m.kv.weight[:16].mul_(0.25)
            m.kv.bias[:16].mul_(0.25)
    torch.testing.assert_close(m(x), before, **TOL)


def test_aggregated_rejects_even_window_and_small_maps():
    with pytest.raises(ValueError, match="window_size=4"):
        attnzoo.create("aggregated", 16, num_heads=2, window_size=4, input_resolution=(8, 8))
    m = attnzoo.create("aggregated", 16, num_heads=2, sr_ratio=4, input_resolution=(8, 8))
    with pytest.raises(ValueError, match="sr_ratio=4"):
        m(torch.randn(1, 3, 8, 16))
