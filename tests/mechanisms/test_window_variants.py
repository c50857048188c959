"""Windows with other key sets: outlook (a k×k aggregation per location), overlapping_cross (larger overlapping key
windows), long_short_distance (dense and dilated groups).

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


# ---------------------------------------------------------------------------------------------- outlook (VOLO)


@pytest.mark.parametrize("size,kernel,padding,stride", [((7, 9), 3, 1, 1), ((8, 8), 3, 1, 2), ((7, 7), 3, 1, 2)])
def test_outlook_matches_timm(size, kernel, padding, stride):
    from timm.models.volo import OutlookAttention

    ours = build("outlook", 16, num_heads=2, kernel_size=kernel, padding=padding, stride=stride)
    ref = OutlookAttention(16, num_heads=2, kernel_size=kernel, padding=padding, stride=stride).to(DT).eval()
    ref.load_state_dict(ours.state_dict())  # keys v, attn, proj
    x = rand64(2, *size, 16)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_outlook_kernel_one_is_projected_values():
    m = build("outlook", 16, num_heads=2, kernel_size=1, padding=0)
    x = rand64(2, 5, 6, 16)
    torch.testing.assert_close(m(x), m.proj(m.v(x)), **TOL)


def test_outlook_output_depends_on_a_2k_minus_1_neighbourhood():
    m = build("outlook", 8, num_heads=2, kernel_size=3, padding=1)
    x = rand64(1, 9, 9, 8).requires_grad_()
    m(x)[0, 4, 4].sum().backward()
    support = x.grad[0].abs().sum(-1) > 0
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    expected = ((ys - 4).abs() <= 2) & ((xs - 4).abs() <= 2)
    assert torch.equal(support, expected)


def test_outlook_rejects_inconsistent_geometry():
    m = attnzoo.create("outlook", 16, num_heads=2, kernel_size=3, padding=0, stride=1)
    with pytest.raises(ValueError, match="kernel_size=3"):
        m(torch.randn(1, 6, 6, 16))


# ------------------------------------------------------------------------------ long_short_distance (CrossFormer)


def lsda_reference(m, x, group, interval, mask_padding=True):
    """CrossFormer LSDA densely: keys restricted to the query's group, DPB at Δ = query − key in group coordinates."""
    b, h, w, c = x.shape
    hp, wp = (math.ceil(s / (group * i)) * group * i for s, i in zip((h, w), interval))
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    ys, xs = coords(hp, wp).unbind(-1)
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
    out = dense_attention(
        heads_of(q, nh), heads_of(k, nh), heads_of(v, nh), scale=m.head_dim**-0.5, bias=bias, allowed=allowed
    )
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
    m = build("long_short_distance", 32, num_heads=2, window_size=4, distance=mode)
    assert m.geometry(size) == expected_geometry
    x = rand64(2, *size, 32)
    torch.testing.assert_close(m(x), lsda_reference(m, x, *expected_geometry), **TOL)


def test_long_short_distance_unmasked_padding_and_global_equivalence():
    m = build("long_short_distance", 32, num_heads=2, window_size=4, distance="short", mask_padding=False)
    x = rand64(1, 6, 7, 32)
    torch.testing.assert_close(m(x), lsda_reference(m, x, 4, (1, 1), mask_padding=False), **TOL)
    # G = H = W: short and long both equal global attention + DPB
    short = build("long_short_distance", 32, num_heads=2, window_size=5, distance="short")
    long = build("long_short_distance", 32, num_heads=2, window_size=5, distance="long")
    x = rand64(1, 5, 5, 32)
    torch.testing.assert_close(short(x), long(x), **TOL)


def test_long_short_distance_dpb_shape_and_group_size_independence():
    m = build("long_short_distance", 32, num_heads=2, window_size=4)
    assert m.pos.pos_proj.weight.shape == (2, 2)  # D = C/16, CrossFormer's DynamicPosBias(dim // 4) with pos_dim // 4
    other = attnzoo.create("long_short_distance", 32, num_heads=2, window_size=7)
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
    out = dense_attention(qw, kv[0], kv[1], scale=(c // nh) ** -0.5, bias=bias)
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
        qy, qx = coords(ws, ws).unbind(-1)
        ky, kx = coords(ows, ows).unbind(-1)
        dy = ky[None, :] - halo - qy[:, None] + ows - 1  # pixel offset key − query, shifted to the engine index
        dx = kx[None, :] - halo - qx[:, None] + ows - 1
        assert torch.equal(m.engine_index[dy, dx], hat_rpi(ws, ows) % (side * side))


@pytest.mark.parametrize("size,ws,ratio", [((8, 8), 4, 0.5), ((12, 8), 4, 0.5), ((6, 9), 3, 0.7), ((8, 12), 4, 0.0)])
def test_overlapping_cross_matches_hat_oca(size, ws, ratio):
    m = build("overlapping_cross", 16, num_heads=2, window_size=ws, overlap_ratio=ratio)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), oca_reference(m, x), **TOL)


def test_overlapping_cross_without_bias_and_unmasked_padding():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5, rel_pos_bias=False)
    x = rand64(1, 8, 4, 16)
    torch.testing.assert_close(m(x), oca_reference(m, x), **TOL)
    # mask_padding=False: a 7×6 map behaves as HAT on the zero-padded 8×8 map, cropped
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5, mask_padding=False)
    x = rand64(1, 7, 6, 16)
    padded = F.pad(x, (0, 0, 0, 2, 0, 1))
    torch.testing.assert_close(m(x), oca_reference(m, padded)[:, :7, :6], **TOL)


def test_overlapping_cross_ratio_zero_is_window_attention_with_key_minus_query_table():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.0)
    x = rand64(1, 8, 8, 16)
    ys, xs = coords(8, 8).unbind(-1)
    allowed = ((ys // 4)[:, None] == (ys // 4)[None, :]) & ((xs // 4)[:, None] == (xs // 4)[None, :])
    dy, dx = ys[None, :] % 4 - ys[:, None] % 4, xs[None, :] % 4 - xs[:, None] % 4  # key − query in the window
    index = ((dy + 1) * 7 + dx + 1) % 49  # HAT with M_o = M: row = Δ + 1
    bias = m.relative_position_bias_table[index].permute(2, 0, 1)
    q, k, v = m.qkv(x.reshape(1, 64, 16)).chunk(3, -1)
    out = dense_attention(heads_of(q, 2), heads_of(k, 2), heads_of(v, 2), scale=8**-0.5, bias=bias, allowed=allowed)
    torch.testing.assert_close(m(x), m.proj(out.reshape(1, 64, 16)).reshape(x.shape), **TOL)


def test_overlapping_cross_window_depends_only_on_its_extended_region():
    m = build("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.5)  # M_o = 6, halo 1
    x = rand64(1, 12, 12, 16)
    inside, outside = x.clone(), x.clone()
    inside[0, 8, 5] += 1.0  # row 8 is in the halo of window rows 4..7
    outside[0, 9, 5] += 1.0
    base = m(x)[0, 4:8, 4:8]
    torch.testing.assert_close(m(outside)[0, 4:8, 4:8], base, rtol=0, atol=0)
    assert not torch.allclose(m(inside)[0, 4:8, 4:8], base)


def test_overlapping_cross_rejects_odd_overlap():
    with pytest.raises(ValueError, match="overlap_ratio"):
        attnzoo.create("overlapping_cross", 16, num_heads=2, window_size=4, overlap_ratio=0.25)
