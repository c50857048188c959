"""Row, column and stripe attention: axial, criss_cross, cross_shaped.

References are dense masked attention written here from the definitions; float64, eval mode, every parameter
randomised.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo

from conftest import coords, create_random, dense_attention, rand64

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


# ---------------------------------------------------------------------------------------------------- cross_shaped


def cswin_oracle(m, x):
    """Per-stripe dense attention + per-stripe LePE conv, from the CSWin definition, stripes by slicing."""
    bsz, h, w, c = x.shape
    q, k, v = m.qkv(x).reshape(bsz, h, w, 3, -1).unbind(3)
    inner = q.shape[-1]
    sw = m.window_size
    halves = []
    for branch in range(m.branches):
        sl = slice(branch * inner // m.branches, (branch + 1) * inner // m.branches)
        out = torch.zeros(bsz, h, w, inner // m.branches, dtype=DT)
        if m.last_stage:
            stripes = [(slice(0, h), slice(0, w))]
        elif branch == 0:
            stripes = [(slice(0, h), slice(s, min(s + sw, w))) for s in range(0, w, sw)]
        else:
            stripes = [(slice(s, min(s + sw, h)), slice(0, w)) for s in range(0, h, sw)]
        heads = m.num_heads // m.branches
        for rows, cols in stripes:
            qs, ks, vs = (t[:, rows, cols, sl] for t in (q, k, v))
            sh, sww = qs.shape[1:3]
            qf, kf, vf = (t.reshape(bsz, sh * sww, heads, -1) for t in (qs, ks, vs))
            att = dense_attention(qf, kf, vf).reshape(bsz, sh, sww, -1)
            lepe = m.lepe[branch](vs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            out[:, rows, cols] = att + lepe
        halves.append(out)
    return m.proj(torch.cat(halves, -1))


@pytest.mark.parametrize(
    "size, split, last_stage", [((6, 6), 2, False), ((7, 5), 3, False), ((4, 6), 1, False), ((5, 5), 5, True)]
)
def test_cross_shaped_equals_stripe_oracle(size, split, last_stage):
    m = create_random("cross_shaped", 16, num_heads=4, window_size=split, last_stage=last_stage)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), cswin_oracle(m, x), **TOL)


def test_cross_shaped_split_equal_to_input_is_global_in_both_branches():
    m = create_random("cross_shaped", 16, num_heads=4, window_size=5)
    x = rand64(1, 5, 5, 16)
    q, k, v = m.qkv(x).reshape(1, 25, 3, 16).unbind(2)
    halves = []
    for branch in range(2):
        sl = slice(8 * branch, 8 * branch + 8)
        att = dense_attention(*(t[..., sl].reshape(1, 25, 2, 4) for t in (q, k, v))).reshape(1, 5, 5, 8)
        lepe = m.lepe[branch](v[..., sl].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        halves.append(att + lepe)
    torch.testing.assert_close(m(x), m.proj(torch.cat(halves, -1)), **TOL)


def test_cross_shaped_branch_locality_before_projection():
    m = create_random("cross_shaped", 16, num_heads=4, window_size=2)
    with torch.no_grad():  # identity projection exposes the concatenated branches
        m.proj.weight.copy_(torch.eye(16))
        m.proj.bias.zero_()
    x = rand64(1, 6, 6, 16)
    y0 = m(x)
    x1 = x.clone()
    x1[0, 4, 1] += 1.0
    diff = (m(x1) - y0).abs()[0]
    first, second = diff[..., :8].amax(-1) > 1e-12, diff[..., 8:].amax(-1) > 1e-12
    column_stripe = torch.zeros(6, 6, dtype=torch.bool)
    column_stripe[:, 0:2] = True
    row_stripe = torch.zeros(6, 6, dtype=torch.bool)
    row_stripe[4:6, :] = True
    assert torch.equal(first, column_stripe) and torch.equal(second, row_stripe)


def test_cross_shaped_odd_heads_rejected():
    with pytest.raises(ValueError, match="num_heads=3"):
        attnzoo.create("cross_shaped", 12, num_heads=3)


# ---------------------------------------------------------------------------------------------------- criss_cross


def criss_cross_dense(m, x):
    """γ·CCA(x) with one softmax over the row-or-column mask (centre once), dense over all pixels."""
    b, h, w, c = x.shape
    nchw = x.permute(0, 3, 1, 2)
    q, k, v = (conv(nchw).flatten(2).transpose(1, 2) for conv in (m.query_conv, m.key_conv, m.value_conv))
    p = coords(h, w)
    allowed = (p[:, None, 0] == p[None, :, 0]) | (p[:, None, 1] == p[None, :, 1])
    logits = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
    return m.gamma * (logits.softmax(-1) @ v).reshape(b, h, w, c)


@pytest.mark.parametrize("size", [(5, 6), (1, 4), (4, 1)])
def test_criss_cross_single_pass_equals_dense_row_or_column_attention(size):
    m = create_random("criss_cross", 16, reduction=4, recurrence=1)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), criss_cross_dense(m, x), **TOL)


def test_criss_cross_recurrence_composes_the_paper_module():
    m = create_random("criss_cross", 16, reduction=4, recurrence=2)
    x = rand64(1, 4, 5, 16)
    x1 = x + criss_cross_dense(m, x)
    x2 = x1 + criss_cross_dense(m, x1)
    torch.testing.assert_close(m(x), x2 - x, **TOL)


def test_criss_cross_gamma_zero_gives_zero():
    m = attnzoo.create("criss_cross", 16, reduction=4).to(DT)  # gamma_init=0 as CCNet
    assert torch.equal(m(rand64(1, 4, 5, 16)), torch.zeros(1, 4, 5, 16, dtype=DT))


@pytest.mark.parametrize("recurrence", [1, 2])
def test_criss_cross_receptive_field(recurrence):
    m = create_random("criss_cross", 8, reduction=2, recurrence=recurrence)
    x = rand64(1, 4, 5, 8).requires_grad_()
    m(x)[0, 1, 2].sum().backward()
    reached = x.grad[0].abs().amax(-1) > 1e-12
    c = coords(4, 5).reshape(4, 5, 2)
    expected = (c[..., 0] == 1) | (c[..., 1] == 2) if recurrence == 1 else torch.ones(4, 5, dtype=torch.bool)
    assert torch.equal(reached, expected)


# ---------------------------------------------------------------------------------------------------- axial


def mha_from(module, step: int) -> torch.nn.MultiheadAttention:
    mha = torch.nn.MultiheadAttention(module.dim, module.num_heads, batch_first=True).to(DT).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(module.qkv[step].weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(module.proj[step].weight)
        mha.out_proj.bias.copy_(module.proj[step].bias)
    return mha


@pytest.mark.parametrize("axis", [0, 1])
def test_axial_single_axis_is_mhsa_along_it(axis):
    m = create_random("axial", 16, num_heads=2, axes=[axis])
    x = rand64(2, 5, 6, 16)
    mha = mha_from(m, 0)
    lines = x.movedim(1 + axis, 2)  # [B, other, L, C]
    flat = lines.reshape(-1, lines.shape[2], 16)
    expected = mha(flat, flat, flat, need_weights=False)[0].reshape(lines.shape).movedim(2, 1 + axis)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_axial_sequential_is_width_after_height_and_sum_adds():
    seq = create_random("axial", 16, num_heads=2)
    summed = attnzoo.create("axial", 16, num_heads=2, combine="sum").to(DT).eval()
    summed.load_state_dict(seq.state_dict())
    x = rand64(1, 4, 5, 16)
    col, row = mha_from(seq, 0), mha_from(seq, 1)

    def along_h(t):
        f = t.transpose(1, 2).reshape(-1, t.shape[1], 16)
        return col(f, f, f, need_weights=False)[0].reshape(t.shape[0], t.shape[2], t.shape[1], 16).transpose(1, 2)

    def along_w(t):
        f = t.reshape(-1, t.shape[2], 16)
        return row(f, f, f, need_weights=False)[0].reshape(t.shape)

    torch.testing.assert_close(seq(x), along_w(along_h(x)), **TOL)
    torch.testing.assert_close(summed(x), along_h(x) + along_w(x), **TOL)


@pytest.mark.parametrize("combine", ["sum", "sequential"])
def test_axial_receptive_field(combine):
    m = create_random("axial", 8, num_heads=2, combine=combine)
    x = rand64(1, 4, 5, 8).requires_grad_()
    m(x)[0, 1, 2].sum().backward()
    reached = x.grad[0].abs().amax(-1) > 1e-12
    c = coords(4, 5).reshape(4, 5, 2)
    expected = (c[..., 0] == 1) | (c[..., 1] == 2) if combine == "sum" else torch.ones(4, 5, dtype=torch.bool)
    assert torch.equal(reached, expected)


def test_axial_axis_subset_in_4d_is_mhsa_over_the_plane():
    m = create_random("axial", 8, num_heads=2, axes=[(0, 1)], rank=4)  # EPIT: attention over the (U, V) plane
    x = rand64(1, 2, 3, 2, 2, 8)
    mha = mha_from(m, 0)
    plane = x.permute(0, 3, 4, 1, 2, 5).reshape(4, 6, 8)  # batch over (H, W), tokens over (U, V)
    expected = mha(plane, plane, plane, need_weights=False)[0].reshape(1, 2, 2, 2, 3, 8).permute(0, 3, 4, 1, 2, 5)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_axial_bad_axes_name_the_argument():
    with pytest.raises(ValueError, match="axes="):
        attnzoo.create("axial", 16, axes=[2])
