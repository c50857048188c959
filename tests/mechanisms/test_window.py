"""Parity and paper properties for window, halo, multi_axis, cross_shaped, criss_cross, axial.

References are external modules with copied weights (torchvision / timm) or dense masked attention written here
from the definitions; float64, eval mode, every parameter randomised.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


def randomize(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.to(DT).eval()


def make(name: str, dim: int, **kwargs) -> torch.nn.Module:
    return randomize(attnzoo.create(name, dim, **kwargs))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def dense_attention(q, k, v, bias=None, scale=None):
    """Softmax attention ``[B, N, h, d]`` with an additive ``bias`` broadcast to ``[B, h, N, M]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if bias is not None:
        logits = logits + bias
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v)


def split_qkv(linear_out: torch.Tensor, heads: int):
    """``[..., 3·h·d]`` in (three, heads, d) order → q, k, v ``[B, N, h, d]``."""
    b, c = linear_out.shape[0], linear_out.shape[-1]
    t = linear_out.reshape(b, -1, 3, heads, c // (3 * heads))
    return t.unbind(2)


def coords(*shape: int) -> torch.Tensor:
    """``[N, D]`` integer coordinates, row-major."""
    return torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, len(shape))


def changed_positions(module, x, position, eps=1.0):
    """Boolean spatial map of outputs that change when the token at ``position`` is perturbed."""
    y0 = module(x)
    x1 = x.clone()
    x1[(0, *position)] += eps
    y1 = module(x1)
    return ((y1 - y0).abs().amax(-1)[0] > 1e-12)


# ---------------------------------------------------------------------------------------------------- window


def swin_table_bias(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[h, M², M²]`` from Swin's ``((2M-1)², h)`` table, index (query − key) computed here."""
    c = coords(*window)
    rel = c[:, None, :] - c[None, :, :] + torch.tensor(window) - 1
    index = rel[..., 0] * (2 * window[1] - 1) + rel[..., 1]
    return table[index].permute(2, 0, 1)


@pytest.mark.parametrize("size, shift", [((8, 8), 0), ((8, 8), 2), ((15, 17), 0), ((15, 17), 2), ((3, 5), 2)])
def test_window_matches_torchvision_shifted_window_attention(size, shift):
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    ref = randomize(ShiftedWindowAttention(16, [4, 4], [shift, shift], num_heads=2))
    ours = attnzoo.create("window", 16, num_heads=2, window_size=4, shift_size=shift, mask_padding=False).to(DT)
    keys = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table")
    ours.load_state_dict({k: ref.state_dict()[k] for k in keys})
    x = rand(2, *size, 16)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def swin_reference(module, x, window, shift, mask_padding):
    """Official SW-MSA with timm's per-window ``WindowAttention``: pad, roll by −S, partition, region mask
    (+ padded-key mask when ``mask_padding``), attention, reverse, roll back, crop."""
    from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse

    attn = WindowAttention(module.dim, num_heads=module.num_heads, window_size=window).to(DT).eval()
    attn.fused_attn = False
    attn.load_state_dict(module.state_dict(), strict=False)
    attn.relative_position_bias_table.data.copy_(module.relative_position_bias_table)
    b, h, w, c = x.shape
    m = window[0]
    hp, wp = -(-h // m) * m, -(-w // m) * m
    xp = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    label = torch.zeros(hp, wp)
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True
    if shift:
        xp = torch.roll(xp, (-shift, -shift), (1, 2))
        valid = torch.roll(valid, (-shift, -shift), (0, 1))
        count = 0
        for rows in (slice(0, hp - m), slice(hp - m, hp - shift), slice(hp - shift, hp)):
            for cols in (slice(0, wp - m), slice(wp - m, wp - shift), slice(wp - shift, wp)):
                label[rows, cols] = count
                count += 1
    lab = window_partition(label[None, :, :, None], window).reshape(-1, m * m)
    val = window_partition(valid[None, :, :, None].to(DT), window).reshape(-1, m * m) > 0
    blocked = (lab[:, :, None] != lab[:, None, :]) | (~val[:, None, :] if mask_padding else False)
    mask = torch.zeros(blocked.shape, dtype=DT).masked_fill(blocked, float("-inf"))
    out = attn(window_partition(xp, window).reshape(-1, m * m, c), mask=mask)
    out = window_reverse(out.reshape(-1, m, m, c), window, hp, wp)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :h, :w]


@pytest.mark.parametrize("shift", [0, 2])
def test_window_matches_timm_window_attention_on_partitioned_windows(shift):
    ours = make("window", 16, num_heads=2, window_size=4, shift_size=shift)
    x = rand(2, 8, 12, 16)
    torch.testing.assert_close(ours(x), swin_reference(ours, x, (4, 4), shift, mask_padding=True), **TOL)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_masked_padding_equals_official_algorithm_with_padded_keys_dropped(shift):
    ours = make("window", 16, num_heads=2, window_size=4, shift_size=shift)
    x = rand(1, 7, 10, 16)
    torch.testing.assert_close(ours(x), swin_reference(ours, x, (4, 4), shift, mask_padding=True), **TOL)
    unmasked = make("window", 16, num_heads=2, window_size=4, shift_size=shift, mask_padding=False)
    unmasked.load_state_dict(ours.state_dict())
    assert not torch.allclose(unmasked(x), ours(x))  # the padded keys do take part when unmasked


def test_window_shift_zero_perturbation_stays_in_its_window():
    m = make("window", 16, num_heads=2, window_size=4)
    changed = changed_positions(m, rand(1, 8, 8, 16), (5, 2))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:8, 0:4] = True
    assert torch.equal(changed, expected)


def test_window_larger_than_input_is_global_attention_with_rel_pos_bias():
    m = make("window", 16, num_heads=2, window_size=8, shift_size=4)  # shift is dropped: one window
    x = rand(2, 5, 6, 16)
    q, k, v = split_qkv(m.qkv(x), 2)
    table = swin_table_bias(m.relative_position_bias_table, (8, 8))  # [h, 64, 64] on the 8x8 window
    keep = (coords(8, 8)[:, 0] < 5) & (coords(8, 8)[:, 1] < 6)
    bias = table[:, keep][:, :, keep]
    expected = m.proj(dense_attention(q, k, v, bias).reshape(2, 5, 6, 16))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_window_shifted_commutes_with_rolls_by_window_multiples_when_unshifted():
    m = make("window", 16, num_heads=2, window_size=4)
    x = rand(1, 8, 12, 16)
    rolled = torch.roll(x, (4, -8), (1, 2))
    torch.testing.assert_close(m(rolled), torch.roll(m(x), (4, -8), (1, 2)), **TOL)


@pytest.mark.parametrize("rank, size, window, shift, mask_padding", [
    (2, (8, 12), 4, 2, True), (2, (8, 12), 4, (2, 1), True), (2, (7, 10), 4, 2, False), (2, (4, 8), 4, 2, True),
    (1, (12,), 4, 3, True), (3, (4, 8, 8), (2, 4, 4), (1, 2, 2), True),
])  # fmt: skip
def test_window_rolled_formulation_equals_the_offset_grid_canvas(rank, size, window, shift, mask_padding):
    """backend='auto' runs SW-MSA as roll + windows + region mask; a named backend as windows on the padded canvas."""
    m = make("window", 16, num_heads=2, window_size=window, shift_size=shift, rank=rank, mask_padding=mask_padding)
    x = rand(2, *size, 16)
    canvas = make("window", 16, num_heads=2, window_size=window, shift_size=shift, rank=rank,
                  mask_padding=mask_padding, backend="reference")  # fmt: skip
    canvas.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), canvas(x), **TOL)
    x.requires_grad_()
    grads = [torch.autograd.grad(mod(x).square().sum(), (x, mod.relative_position_bias_table)) for mod in (m, canvas)]
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, **TOL)


def test_window_cached_mask_follows_table_edits_in_eval():
    m = make("window", 16, num_heads=2, window_size=4, shift_size=2)
    canvas = make("window", 16, num_heads=2, window_size=4, shift_size=2, backend="reference")
    x = rand(1, 8, 8, 16)
    with torch.no_grad():
        first = m(x)
        assert torch.equal(m(x), first)  # served from the cache
        m.relative_position_bias_table.mul_(-3.0)  # in-place edit: a new version of the table
        canvas.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), canvas(x), **TOL)
        m.load_state_dict({**m.state_dict(), "relative_position_bias_table": torch.zeros(49, 2, dtype=DT)})
        canvas.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), canvas(x), **TOL)
    assert not torch.allclose(first, canvas(x))


def test_window_bad_shift_names_the_argument():
    with pytest.raises(ValueError, match="shift_size=4"):
        attnzoo.create("window", 16, window_size=4, shift_size=4)


# ---------------------------------------------------------------------------------------------------- halo


def halo_oracle(m, x):
    """Dense per-query attention over the zero-padded canvas, from the HaloNet definition (stride 1)."""
    bsz, h, w, _ = x.shape
    b, halo = m.block_size, m.halo_size
    win = b + 2 * halo
    hp, wp = -(-h // b) * b, -(-w // b) * b
    heads, d = m.num_heads, m.head_dim
    q = m.q(x).reshape(bsz, h * w, heads, d)
    kv = F.pad(m.kv(x), (0, 0, halo, halo + wp - w, halo, halo + hp - h))  # canvas coords = image + halo
    kv = kv.reshape(bsz, -1, heads, d + m.head_dim_v)
    k, v = kv[..., :d], kv[..., d:]
    qc, kc = coords(h, w), coords(hp + 2 * halo, wp + 2 * halo)
    start = (qc // b) * b  # window top-left in canvas coords = block start in image coords
    j = kc[None, :, :] - start[:, None, :]  # key position inside the query's window
    i = qc - start  # query position inside its block
    inside = ((j >= 0) & (j < win)).all(-1)
    real = ((kc >= halo) & (kc < torch.tensor([h, w]) + halo)).all(-1)
    allowed = inside & (real[None] if m.mask_padding else True)
    ry = (j[..., 0] - i[:, None, 0] + win - 1).clamp(0, 2 * win - 2)
    rx = (j[..., 1] - i[:, None, 1] + win - 1).clamp(0, 2 * win - 2)
    pos = torch.einsum("bnhd,nmd->bhnm", q, m.height_rel[ry]) + torch.einsum("bnhd,nmd->bhnm", q, m.width_rel[rx])
    bias = pos.masked_fill(~allowed, float("-inf"))
    return dense_attention(q, k, v, bias, scale=d**-0.5).reshape(bsz, h, w, -1)


@pytest.mark.parametrize("size, block, halo, stride", [((8, 8), 4, 1, 1), ((8, 12), 4, 2, 1), ((8, 8), 4, 1, 2), ((6, 6), 3, 1, 2)])
def test_halo_matches_timm_halo_attn(size, block, halo, stride):
    from timm.layers.halo_attn import HaloAttn

    from attnzoo.interop.timm import halo_weights

    torch.manual_seed(0)
    ref = randomize(HaloAttn(16, num_heads=2, block_size=block, halo_size=halo, stride=stride))
    ours = attnzoo.create("halo", 16, num_heads=2, block_size=block, halo_size=halo, stride=stride, mask_padding=False)
    ours.to(DT).load_state_dict(halo_weights(ref))  # kv keeps timm's per-head [k_h, v_h] interleave
    x = rand(2, *size, 16)
    torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **TOL)


@pytest.mark.parametrize("size, block, halo, mask_padding", [
    ((8, 8), 4, 1, True), ((7, 10), 4, 1, True), ((7, 10), 4, 2, False), ((6, 9), 3, 0, True), ((4, 4), 4, 0, True),
])  # fmt: skip
def test_halo_equals_dense_oracle(size, block, halo, mask_padding):
    m = make("halo", 16, num_heads=2, block_size=block, halo_size=halo, mask_padding=mask_padding)
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), halo_oracle(m, x), **TOL)


def test_halo_zero_with_block_equal_input_is_global_attention_with_factorised_rel_pos():
    m = make("halo", 16, num_heads=2, block_size=4, halo_size=0)
    x = rand(1, 4, 4, 16)
    q = m.q(x).reshape(1, 16, 2, 8)
    kv = m.kv(x).reshape(1, 16, 2, 16)
    c = coords(4, 4)
    rel = c[None, :, :] - c[:, None, :] + 3  # key − query + w − 1
    pos = torch.einsum("bnhd,nmd->bhnm", q, m.height_rel[rel[..., 0]]) + torch.einsum(
        "bnhd,nmd->bhnm", q, m.width_rel[rel[..., 1]]
    )
    expected = dense_attention(q, kv[..., :8], kv[..., 8:], pos).reshape(1, 4, 4, 16)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_halo_masked_block_depends_only_on_its_region():
    m = make("halo", 16, num_heads=2, block_size=4, halo_size=1)
    x = rand(1, 12, 12, 16)
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[3:9, 3:9] = True
    for pos in [(0, 0), (2, 5), (9, 9), (3, 3), (8, 4), (5, 6)]:
        changed = changed_positions(m, x, pos)[4:8, 4:8].any().item()
        assert changed == bool(region[pos]), pos


# ---------------------------------------------------------------------------------------------------- multi_axis


def maxvit_reference(kind: str, head_first: bool, P: int = 4):
    from timm.layers.pos_embed_rel import RelPosBiasTf
    from timm.models import maxxvit

    ref = maxxvit.AttentionCl(32, dim_head=16, bias=True, head_first=head_first,
                              rel_pos_cls=partial(RelPosBiasTf, window_size=(P, P)))  # fmt: skip
    ref.fused_attn = False
    randomize(ref)
    part, rev = {"block": (maxxvit.window_partition, maxxvit.window_reverse),
                 "grid": (maxxvit.grid_partition, maxxvit.grid_reverse)}[kind]  # fmt: skip

    def run(x):
        return rev(ref(part(x, [P, P])), [P, P], list(x.shape[1:3]))

    return ref, run


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("head_first", [False, True])
def test_multi_axis_matches_timm_attention_cl(kind, head_first):
    from attnzoo.interop.timm import maxvit_attention_weights

    ref, run = maxvit_reference(kind, head_first)
    ours = attnzoo.create("multi_axis", 32, head_dim=16, partition_size=4, partition_type=kind).to(DT).eval()
    # timm rw layout (head_first) is per head [q_h, k_h, v_h]; ours is [q, k, v] with heads inside
    ours.load_state_dict(maxvit_attention_weights(ref))
    x = rand(2, 8, 12, 32)
    torch.testing.assert_close(ours(x), run(x), **TOL)


def test_multi_axis_grid_is_block_on_space_to_depth_transposed_input():
    block = make("multi_axis", 16, num_heads=2, partition_size=4, partition_type="block")
    grid = attnzoo.create("multi_axis", 16, num_heads=2, partition_size=4, partition_type="grid").to(DT).eval()
    grid.load_state_dict(block.state_dict())
    x = rand(2, 8, 12, 16)

    def transpose(t, g=4):  # (g1, a) -> (a, g1) on each axis: grid groups become contiguous blocks
        b, h, w, c = t.shape
        return t.reshape(b, g, h // g, g, w // g, c).permute(0, 2, 1, 4, 3, 5).reshape(b, h, w, c)

    def untranspose(t, g=4):
        b, h, w, c = t.shape
        return t.reshape(b, h // g, g, w // g, g, c).permute(0, 2, 1, 4, 3, 5).reshape(b, h, w, c)

    torch.testing.assert_close(grid(x), untranspose(block(transpose(x))), **TOL)


def test_multi_axis_full_partition_is_global_attention_with_key_minus_query_bias():
    x = rand(2, 4, 4, 16)
    first = make("multi_axis", 16, num_heads=2, partition_size=4, partition_type="block")
    grid = attnzoo.create("multi_axis", 16, num_heads=2, partition_size=4, partition_type="grid").to(DT).eval()
    grid.load_state_dict(first.state_dict())
    outputs = [first(x), grid(x)]
    q, k, v = split_qkv(first.qkv(x), 2)
    c = coords(4, 4)
    rel = c[None, :, :] - c[:, None, :] + 3  # key − query
    bias = first.relative_position_bias_table[:, rel[..., 0], rel[..., 1]]
    expected = first.proj(dense_attention(q, k, v, bias).reshape(2, 4, 4, 16))
    for out in outputs:
        torch.testing.assert_close(out, expected, **TOL)


def test_multi_axis_locality_block_window_and_grid_lattice():
    x = rand(1, 8, 8, 16)
    block = make("multi_axis", 16, num_heads=2, partition_size=4, partition_type="block")
    grid = make("multi_axis", 16, num_heads=2, partition_size=4, partition_type="grid")
    c = coords(8, 8).reshape(8, 8, 2)
    same_window = (c[..., 0] // 4 == 1) & (c[..., 1] // 4 == 0)
    same_lattice = (c[..., 0] % 2 == 1) & (c[..., 1] % 2 == 0)
    assert torch.equal(changed_positions(block, x, (5, 2)), same_window)
    assert torch.equal(changed_positions(grid, x, (5, 2)), same_lattice)


def test_multi_axis_non_divisible_block_masks_padding():
    m = make("multi_axis", 16, num_heads=2, partition_size=4, partition_type="block")
    x = rand(1, 5, 6, 16)
    q, k, v = split_qkv(m.qkv(x), 2)
    c = coords(5, 6)
    same = ((c[:, None, :] // 4) == (c[None, :, :] // 4)).all(-1)
    rel = (c[None, :, :] - c[:, None, :]).clamp(-3, 3) + 3
    bias = m.relative_position_bias_table[:, rel[..., 0], rel[..., 1]].masked_fill(~same, float("-inf"))
    torch.testing.assert_close(m(x), m.proj(dense_attention(q, k, v, bias).reshape(1, 5, 6, 16)), **TOL)


# ---------------------------------------------------------------------------------------------------- cross_shaped


def cswin_oracle(m, x):
    """Per-stripe dense attention + per-stripe LePE conv, from the CSWin definition, stripes by slicing."""
    bsz, h, w, c = x.shape
    q, k, v = m.qkv(x).reshape(bsz, h, w, 3, -1).unbind(3)
    inner = q.shape[-1]
    sw = m.split_size
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
            flat = lambda t: t.reshape(bsz, sh * sww, heads, -1)  # noqa: E731
            att = dense_attention(flat(qs), flat(ks), flat(vs)).reshape(bsz, sh, sww, -1)
            lepe = m.lepe[branch](vs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            out[:, rows, cols] = att + lepe
        halves.append(out)
    return m.proj(torch.cat(halves, -1))


@pytest.mark.parametrize("size, split, last_stage", [((6, 6), 2, False), ((7, 5), 3, False), ((4, 6), 1, False), ((5, 5), 5, True)])
def test_cross_shaped_equals_stripe_oracle(size, split, last_stage):
    m = make("cross_shaped", 16, num_heads=4, split_size=split, last_stage=last_stage)
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), cswin_oracle(m, x), **TOL)


def test_cross_shaped_split_equal_to_input_is_global_in_both_branches():
    m = make("cross_shaped", 16, num_heads=4, split_size=5)
    x = rand(1, 5, 5, 16)
    q, k, v = m.qkv(x).reshape(1, 25, 3, 16).unbind(2)
    halves = []
    for branch in range(2):
        sl = slice(8 * branch, 8 * branch + 8)
        att = dense_attention(*(t[..., sl].reshape(1, 25, 2, 4) for t in (q, k, v))).reshape(1, 5, 5, 8)
        lepe = m.lepe[branch](v[..., sl].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        halves.append(att + lepe)
    torch.testing.assert_close(m(x), m.proj(torch.cat(halves, -1)), **TOL)


def test_cross_shaped_branch_locality_before_projection():
    m = make("cross_shaped", 16, num_heads=4, split_size=2)
    with torch.no_grad():  # identity projection exposes the concatenated branches
        m.proj.weight.copy_(torch.eye(16))
        m.proj.bias.zero_()
    x = rand(1, 6, 6, 16)
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
    m = make("criss_cross", 16, reduction=4, recurrence=1)
    x = rand(2, *size, 16)
    torch.testing.assert_close(m(x), criss_cross_dense(m, x), **TOL)


def test_criss_cross_recurrence_composes_the_paper_module():
    m = make("criss_cross", 16, reduction=4, recurrence=2)
    x = rand(1, 4, 5, 16)
    x1 = x + criss_cross_dense(m, x)
    x2 = x1 + criss_cross_dense(m, x1)
    torch.testing.assert_close(m(x), x2 - x, **TOL)


def test_criss_cross_gamma_zero_gives_zero():
    m = attnzoo.create("criss_cross", 16, reduction=4).to(DT)  # gamma_init=0 as CCNet
    assert torch.equal(m(rand(1, 4, 5, 16)), torch.zeros(1, 4, 5, 16, dtype=DT))


@pytest.mark.parametrize("recurrence", [1, 2])
def test_criss_cross_receptive_field(recurrence):
    m = make("criss_cross", 8, reduction=2, recurrence=recurrence)
    x = rand(1, 4, 5, 8).requires_grad_()
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
    m = make("axial", 16, num_heads=2, axes=[axis])
    x = rand(2, 5, 6, 16)
    mha = mha_from(m, 0)
    lines = x.movedim(1 + axis, 2)  # [B, other, L, C]
    flat = lines.reshape(-1, lines.shape[2], 16)
    expected = mha(flat, flat, flat, need_weights=False)[0].reshape(lines.shape).movedim(2, 1 + axis)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_axial_sequential_is_width_after_height_and_sum_adds():
    seq = make("axial", 16, num_heads=2)
    summed = attnzoo.create("axial", 16, num_heads=2, combine="sum").to(DT).eval()
    summed.load_state_dict(seq.state_dict())
    x = rand(1, 4, 5, 16)
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
    m = make("axial", 8, num_heads=2, combine=combine)
    x = rand(1, 4, 5, 8).requires_grad_()
    m(x)[0, 1, 2].sum().backward()
    reached = x.grad[0].abs().amax(-1) > 1e-12
    c = coords(4, 5).reshape(4, 5, 2)
    expected = (c[..., 0] == 1) | (c[..., 1] == 2) if combine == "sum" else torch.ones(4, 5, dtype=torch.bool)
    assert torch.equal(reached, expected)


def test_axial_axis_subset_in_4d_is_mhsa_over_the_plane():
    m = make("axial", 8, num_heads=2, axes=[(0, 1)], rank=4)  # EPIT: attention over the (U, V) plane
    x = rand(1, 2, 3, 2, 2, 8)
    mha = mha_from(m, 0)
    plane = x.permute(0, 3, 4, 1, 2, 5).reshape(4, 6, 8)  # batch over (H, W), tokens over (U, V)
    expected = mha(plane, plane, plane, need_weights=False)[0].reshape(1, 2, 2, 2, 3, 8).permute(0, 3, 4, 1, 2, 5)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_axial_bad_axes_name_the_argument():
    with pytest.raises(ValueError, match="axes="):
        attnzoo.create("axial", 16, axes=[2])
