"""Window and block partitions: window, window_v2, halo, multi_axis, mask_unit, global_context_vit, combiner,
shifted_sparse_group.

References are external modules with copied weights (torchvision / timm) or dense masked attention written here
from the definitions; float64, eval mode, every parameter randomised.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo

from conftest import changed_positions, coords, create_random, dense_attention, rand64, randomize_

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


def split_qkv(linear_out: torch.Tensor, heads: int):
    """``[..., 3·h·d]`` in (three, heads, d) order → q, k, v ``[B, N, h, d]``."""
    b, c = linear_out.shape[0], linear_out.shape[-1]
    t = linear_out.reshape(b, -1, 3, heads, c // (3 * heads))
    return t.unbind(2)


def partition(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nW, m·m, C)`` windows, image-major (timm's ``window_partition``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, c)


def unpartition(windows: torch.Tensor, m: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    return windows.reshape(-1, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


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
    ref = randomize_(ShiftedWindowAttention(16, [4, 4], [shift, shift], num_heads=2)).to(DT).eval()
    ours = attnzoo.create("window", 16, num_heads=2, window_size=4, shift_size=shift, mask_padding=False).to(DT)
    keys = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table")
    ours.load_state_dict({k: ref.state_dict()[k] for k in keys})
    x = rand64(2, *size, 16)
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
    ours = create_random("window", 16, num_heads=2, window_size=4, shift_size=shift)
    x = rand64(2, 8, 12, 16)
    torch.testing.assert_close(ours(x), swin_reference(ours, x, (4, 4), shift, mask_padding=True), **TOL)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_masked_padding_equals_official_algorithm_with_padded_keys_dropped(shift):
    ours = create_random("window", 16, num_heads=2, window_size=4, shift_size=shift)
    x = rand64(1, 7, 10, 16)
    torch.testing.assert_close(ours(x), swin_reference(ours, x, (4, 4), shift, mask_padding=True), **TOL)
    unmasked = create_random("window", 16, num_heads=2, window_size=4, shift_size=shift, mask_padding=False)
    unmasked.load_state_dict(ours.state_dict())
    assert not torch.allclose(unmasked(x), ours(x))  # the padded keys do take part when unmasked


def test_window_shift_zero_perturbation_stays_in_its_window():
    m = create_random("window", 16, num_heads=2, window_size=4)
    changed = changed_positions(m, rand64(1, 8, 8, 16), (5, 2))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:8, 0:4] = True
    assert torch.equal(changed, expected)


def test_window_larger_than_input_is_global_attention_with_rel_pos_bias():
    m = create_random("window", 16, num_heads=2, window_size=8, shift_size=4)  # shift is dropped: one window
    x = rand64(2, 5, 6, 16)
    q, k, v = split_qkv(m.qkv(x), 2)
    table = swin_table_bias(m.relative_position_bias_table, (8, 8))  # [h, 64, 64] on the 8x8 window
    keep = (coords(8, 8)[:, 0] < 5) & (coords(8, 8)[:, 1] < 6)
    bias = table[:, keep][:, :, keep]
    expected = m.proj(dense_attention(q, k, v, bias).reshape(2, 5, 6, 16))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_window_shifted_commutes_with_rolls_by_window_multiples_when_unshifted():
    m = create_random("window", 16, num_heads=2, window_size=4)
    x = rand64(1, 8, 12, 16)
    rolled = torch.roll(x, (4, -8), (1, 2))
    torch.testing.assert_close(m(rolled), torch.roll(m(x), (4, -8), (1, 2)), **TOL)


@pytest.mark.parametrize(
    "rank, size, window, shift, mask_padding",
    [
        (2, (8, 12), 4, 2, True),
        (2, (8, 12), 4, (2, 1), True),
        (2, (7, 10), 4, 2, False),
        (2, (4, 8), 4, 2, True),
        (1, (12,), 4, 3, True),
        (3, (4, 8, 8), (2, 4, 4), (1, 2, 2), True),
    ],
)
def test_window_rolled_formulation_equals_the_offset_grid_canvas(rank, size, window, shift, mask_padding):
    """backend='auto' runs SW-MSA as roll + windows + region mask; a named backend as windows on the padded canvas."""
    m = create_random(
        "window", 16, num_heads=2, window_size=window, shift_size=shift, rank=rank, mask_padding=mask_padding
    )
    x = rand64(2, *size, 16)
    canvas = create_random(
        "window",
        16,
        num_heads=2,
        window_size=window,
        shift_size=shift,
        rank=rank,
        mask_padding=mask_padding,
        backend="reference",
    )
    canvas.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), canvas(x), **TOL)
    x.requires_grad_()
    grads = [torch.autograd.grad(mod(x).square().sum(), (x, mod.relative_position_bias_table)) for mod in (m, canvas)]
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, **TOL)


def test_window_cached_mask_follows_table_edits_in_eval():
    m = create_random("window", 16, num_heads=2, window_size=4, shift_size=2)
    canvas = create_random("window", 16, num_heads=2, window_size=4, shift_size=2, backend="reference")
    x = rand64(1, 8, 8, 16)
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


# ---------------------------------------------------------------------------------------------------- window_v2


def timm_swin_v2(module):
    from timm.models.swin_transformer_v2 import WindowAttention

    ref = WindowAttention(module.dim, window_size=module.window_size, num_heads=module.num_heads).to(DT).eval()
    missing = ref.load_state_dict(module.state_dict(), strict=False)
    assert not missing.unexpected_keys and set(missing.missing_keys) <= {
        "k_bias",
        "relative_coords_table",
        "relative_position_index",
    }
    return ref


def test_window_v2_matches_timm_swin_v2_window_attention():
    ours = create_random("window_v2", 16, num_heads=2, window_size=4)
    with torch.no_grad():
        ours.logit_scale.copy_(torch.tensor([[[0.3]], [[5.0]]]))  # the second is clamped at log(100)
    ref = timm_swin_v2(ours)
    x = rand64(2, 8, 12, 16)
    expected = unpartition(ref(partition(x, 4)), 4, 8, 12)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_window_v2_shifted_matches_timm_with_roll_and_region_mask():
    m, s = 4, 2
    ours = create_random("window_v2", 16, num_heads=2, window_size=m, shift_size=s)
    ref = timm_swin_v2(ours)
    x = rand64(2, 8, 8, 16)
    h = w = 8
    label = torch.zeros(h, w)
    count = 0
    for rows in (slice(0, h - m), slice(h - m, h - s), slice(h - s, h)):
        for cols in (slice(0, w - m), slice(w - m, w - s), slice(w - s, w)):
            label[rows, cols] = count
            count += 1
    lab = partition(label[None, :, :, None], m)[..., 0]
    mask = torch.zeros(lab.shape[0], m * m, m * m, dtype=DT).masked_fill(
        lab[:, :, None] != lab[:, None, :], float("-inf")
    )
    out = ref(partition(torch.roll(x, (-s, -s), (1, 2)), m), mask=mask)
    expected = torch.roll(unpartition(out, m, h, w), (s, s), (1, 2))
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_window_v2_fixed_temperature_without_cpb_is_cosine_window_attention():
    ours = create_random("window_v2", 16, num_heads=2, window_size=4)
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(7.0))
        ours.cpb_mlp[-1].weight.zero_()  # σ(0)·16 = 8 on every offset: a constant, softmax-invariant
    x = rand64(1, 8, 8, 16)
    bias = torch.cat((ours.q_bias, torch.zeros_like(ours.q_bias), ours.v_bias))
    q, k, v = F.linear(partition(x, 4), ours.qkv.weight, bias).reshape(-1, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = 7.0 * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, 16, 16)
    torch.testing.assert_close(ours(x), unpartition(ours.proj(out), 4, 8, 8), **TOL)


# ---------------------------------------------------------------------------------------------------- halo


def halo_oracle(m, x):
    """Dense per-query attention over the zero-padded canvas, from the HaloNet definition (stride 1)."""
    bsz, h, w, _ = x.shape
    b, halo = m.window_size, m.halo_size
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


@pytest.mark.parametrize(
    "size, block, halo, stride", [((8, 8), 4, 1, 1), ((8, 12), 4, 2, 1), ((8, 8), 4, 1, 2), ((6, 6), 3, 1, 2)]
)
def test_halo_matches_timm_halo_attn(size, block, halo, stride):
    from timm.layers.halo_attn import HaloAttn

    from attnzoo.interop.timm import halo_weights

    torch.manual_seed(0)
    ref = randomize_(HaloAttn(16, num_heads=2, block_size=block, halo_size=halo, stride=stride)).to(DT).eval()
    ours = attnzoo.create("halo", 16, num_heads=2, window_size=block, halo_size=halo, stride=stride, mask_padding=False)
    ours.to(DT).load_state_dict(halo_weights(ref))  # kv keeps timm's per-head [k_h, v_h] interleave
    x = rand64(2, *size, 16)
    torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **TOL)


@pytest.mark.parametrize(
    "size, block, halo, mask_padding",
    [
        ((8, 8), 4, 1, True),
        ((7, 10), 4, 1, True),
        ((7, 10), 4, 2, False),
        ((6, 9), 3, 0, True),
        ((4, 4), 4, 0, True),
    ],
)
def test_halo_equals_dense_oracle(size, block, halo, mask_padding):
    m = create_random("halo", 16, num_heads=2, window_size=block, halo_size=halo, mask_padding=mask_padding)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(m(x), halo_oracle(m, x), **TOL)


def test_halo_zero_with_block_equal_input_is_global_attention_with_factorised_rel_pos():
    m = create_random("halo", 16, num_heads=2, window_size=4, halo_size=0)
    x = rand64(1, 4, 4, 16)
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
    m = create_random("halo", 16, num_heads=2, window_size=4, halo_size=1)
    x = rand64(1, 12, 12, 16)
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[3:9, 3:9] = True
    for pos in [(0, 0), (2, 5), (9, 9), (3, 3), (8, 4), (5, 6)]:
        changed = changed_positions(m, x, pos)[4:8, 4:8].any().item()
        assert changed == bool(region[pos]), pos


# ---------------------------------------------------------------------------------------------------- multi_axis


def maxvit_reference(kind: str, head_first: bool, P: int = 4):
    from timm.layers.pos_embed_rel import RelPosBiasTf
    from timm.models import maxxvit

    ref = maxxvit.AttentionCl(
        32, dim_head=16, bias=True, head_first=head_first, rel_pos_cls=partial(RelPosBiasTf, window_size=(P, P))
    )
    ref.fused_attn = False
    randomize_(ref).to(DT).eval()
    part, rev = {
        "block": (maxxvit.window_partition, maxxvit.window_reverse),
        "grid": (maxxvit.grid_partition, maxxvit.grid_reverse),
    }[kind]

    def run(x):
        return rev(ref(part(x, [P, P])), [P, P], list(x.shape[1:3]))

    return ref, run


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("head_first", [False, True])
def test_multi_axis_matches_timm_attention_cl(kind, head_first):
    from attnzoo.interop.timm import maxvit_attention_weights

    ref, run = maxvit_reference(kind, head_first)
    ours = attnzoo.create("multi_axis", 32, head_dim=16, window_size=4, partition_type=kind).to(DT).eval()
    # timm rw layout (head_first) is per head [q_h, k_h, v_h]; ours is [q, k, v] with heads inside
    ours.load_state_dict(maxvit_attention_weights(ref))
    x = rand64(2, 8, 12, 32)
    torch.testing.assert_close(ours(x), run(x), **TOL)


def test_multi_axis_grid_is_block_on_space_to_depth_transposed_input():
    block = create_random("multi_axis", 16, num_heads=2, window_size=4, partition_type="block")
    grid = attnzoo.create("multi_axis", 16, num_heads=2, window_size=4, partition_type="grid").to(DT).eval()
    grid.load_state_dict(block.state_dict())
    x = rand64(2, 8, 12, 16)

    def transpose(t, g=4):  # (g1, a) -> (a, g1) on each axis: grid groups become contiguous blocks
        b, h, w, c = t.shape
        return t.reshape(b, g, h // g, g, w // g, c).permute(0, 2, 1, 4, 3, 5).reshape(b, h, w, c)

    def untranspose(t, g=4):
        b, h, w, c = t.shape
        return t.reshape(b, h // g, g, w // g, g, c).permute(0, 2, 1, 4, 3, 5).reshape(b, h, w, c)

    torch.testing.assert_close(grid(x), untranspose(block(transpose(x))), **TOL)


def test_multi_axis_full_partition_is_global_attention_with_key_minus_query_bias():
    x = rand64(2, 4, 4, 16)
    first = create_random("multi_axis", 16, num_heads=2, window_size=4, partition_type="block")
    grid = attnzoo.create("multi_axis", 16, num_heads=2, window_size=4, partition_type="grid").to(DT).eval()
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
    x = rand64(1, 8, 8, 16)
    block = create_random("multi_axis", 16, num_heads=2, window_size=4, partition_type="block")
    grid = create_random("multi_axis", 16, num_heads=2, window_size=4, partition_type="grid")
    c = coords(8, 8).reshape(8, 8, 2)
    same_window = (c[..., 0] // 4 == 1) & (c[..., 1] // 4 == 0)
    same_lattice = (c[..., 0] % 2 == 1) & (c[..., 1] % 2 == 0)
    assert torch.equal(changed_positions(block, x, (5, 2)), same_window)
    assert torch.equal(changed_positions(grid, x, (5, 2)), same_lattice)


def test_multi_axis_non_divisible_block_masks_padding():
    m = create_random("multi_axis", 16, num_heads=2, window_size=4, partition_type="block")
    x = rand64(1, 5, 6, 16)
    q, k, v = split_qkv(m.qkv(x), 2)
    c = coords(5, 6)
    same = ((c[:, None, :] // 4) == (c[None, :, :] // 4)).all(-1)
    rel = (c[None, :, :] - c[:, None, :]).clamp(-3, 3) + 3
    bias = m.relative_position_bias_table[:, rel[..., 0], rel[..., 1]].masked_fill(~same, float("-inf"))
    torch.testing.assert_close(m(x), m.proj(dense_attention(q, k, v, bias).reshape(1, 5, 6, 16)), **TOL)


# ---------------------------------------------------------------------------------------------------- mask_unit


def hiera_unroll(x: torch.Tensor, unit: int, stride: int) -> torch.Tensor:
    """``(B, H, W, C)`` → Hiera's unrolled ``(B, N, C)``: token index ``t·num_units + u``, the in-unit index ``t``
    ordered as (pooling offset, pooled position) so that timm's q pooling takes the max over the offsets."""
    b, h, w, c = x.shape
    p = unit // stride
    t = x.reshape(b, h // unit, p, stride, w // unit, p, stride, c)  # b nh ph sh nw pw sw c
    t = t.permute(0, 3, 6, 2, 5, 1, 4, 7)  # b sh sw ph pw nh nw c
    return t.reshape(b, -1, c)


def hiera_roll_back(y: torch.Tensor, h: int, w: int, unit: int, stride: int) -> torch.Tensor:
    b, c, p = y.shape[0], y.shape[-1], unit // stride
    t = y.reshape(b, p, p, h // unit, w // unit, c)  # b ph pw nh nw c
    return t.permute(0, 3, 1, 4, 2, 5).reshape(b, h // unit * p, w // unit * p, c)


@pytest.mark.parametrize("stride", [1, 2])
def test_mask_unit_matches_timm_hiera_mask_unit_attention(stride):
    from timm.models.hiera import MaskUnitAttention

    ours = create_random("mask_unit", 16, num_heads=2, window_size=4, q_stride=stride)
    ref = MaskUnitAttention(16, 16, 2, q_stride=stride**2, window_size=(4 // stride) ** 2, use_mask_unit_attn=True)
    ref = ref.to(DT).eval()
    ref.fused_attn = False
    ref.load_state_dict(ours.state_dict())
    x = rand64(2, 8, 12, 16)
    expected = hiera_roll_back(ref(hiera_unroll(x, 4, stride)), 8, 12, 4, stride)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_mask_unit_perturbation_stays_in_its_unit_and_padding_is_masked():
    ours = create_random("mask_unit", 16, num_heads=2, window_size=4)
    x = rand64(1, 6, 7, 16)
    changed = changed_positions(ours, x, (5, 2))
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[4:, 0:4] = True
    assert torch.equal(changed, expected)
    # the bottom-right unit holds the 2x3 crop plus masked padding: the same as the crop in one padded unit
    torch.testing.assert_close(ours(x)[:, 4:, 4:], ours(x[:, 4:, 4:]), **TOL)


# ---------------------------------------------------------------------------------------------------- global_context_vit


@pytest.mark.parametrize("size, window, levels", [((8, 8), 4, 1), ((16, 16), 4, 2), ((12, 12), 3, 2)])
def test_global_context_vit_matches_timm_feature_block_and_window_attention_global(size, window, levels):
    from timm.models.gcvit import FeatureBlock, WindowAttentionGlobal

    ours = create_random("global_context_vit", 16, num_heads=2, window_size=window, levels=levels)
    gen = FeatureBlock(16, levels).to(DT).eval()
    gen.load_state_dict(
        {k[len("global_block.") :]: v for k, v in ours.state_dict().items() if k.startswith("global_block.")}
    )
    attn = WindowAttentionGlobal(16, 2, (window, window)).to(DT).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("global_block.")}
    state["rel_pos.relative_position_bias_table"] = state.pop("relative_position_bias_table")
    attn.load_state_dict(state)
    x = rand64(2, *size, 16)
    h, w = size
    q_global = gen(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = unpartition(attn(partition(x, window), q_global), window, h, w)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_global_context_vit_every_output_depends_on_every_token():
    ours = create_random("global_context_vit", 16, num_heads=2, window_size=4, levels=1)
    x = rand64(1, 8, 8, 16)
    assert changed_positions(ours, x, (7, 7)).all()


# ---------------------------------------------------------------------------------------------------- combiner


def combiner_oracle(m, x):
    """Per query, one softmax over [own-window keys] + [summary of each other window], by loops; border windows
    are clipped to the grid."""
    b, h, w, c = x.shape
    (mh, mw), heads = m.window_size, m.num_heads
    d = c // heads
    q, k, v = m.qkv(x).reshape(b, h, w, 3, heads, d).unbind(3)
    scale = d**-0.5
    out = torch.zeros(b, h, w, heads, d, dtype=x.dtype)
    windows = [(r, s) for r in range(0, h, mh) for s in range(0, w, mw)]
    for bi in range(b):
        for head in range(heads):
            summaries = []
            for r, s in windows:
                kw = k[bi, r : r + mh, s : s + mw, head].reshape(-1, d)
                vw = v[bi, r : r + mh, s : s + mw, head].reshape(-1, d)
                qw = q[bi, r : r + mh, s : s + mw, head].reshape(-1, d)
                inner = torch.softmax(qw.amax(0) @ kw.T * scale, -1)
                summaries.append((kw.amax(0), inner @ vw))
            for i in range(h):
                for j in range(w):
                    own = (i // mh) * len(range(0, w, mw)) + j // mw
                    r, s = windows[own]
                    keys = [k[bi, r : r + mh, s : s + mw, head].reshape(-1, d)]
                    values = [v[bi, r : r + mh, s : s + mw, head].reshape(-1, d)]
                    for n, (sk, sv) in enumerate(summaries):
                        if n != own:
                            keys.append(sk[None])
                            values.append(sv[None])
                    weights = torch.softmax(q[bi, i, j, head] @ torch.cat(keys).T * scale, -1)
                    out[bi, i, j, head] = weights @ torch.cat(values)
    return m.proj(out.reshape(b, h, w, c))


def test_combiner_matches_loop_oracle():
    ours = create_random("combiner", 16, num_heads=2, window_size=(2, 3))
    x = rand64(2, 4, 6, 16)
    torch.testing.assert_close(ours(x), combiner_oracle(ours, x), **TOL)


def test_combiner_on_a_padded_grid_equals_the_oracle_with_clipped_border_windows():
    """5x7 with 3x3 windows: padded tokens must stay out of the direct keys, the max-pools and the summaries."""
    ours = create_random("combiner", 16, num_heads=2, window_size=3)
    x = rand64(1, 5, 7, 16)
    torch.testing.assert_close(ours(x), combiner_oracle(ours, x), **TOL)


def test_combiner_single_window_is_mhsa_and_every_token_is_reached():
    ours = create_random("combiner", 16, num_heads=2, window_size=6)
    x = rand64(1, 6, 6, 16)
    mhsa = attnzoo.create("mhsa", 16, num_heads=2).to(DT).eval()
    mhsa.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), mhsa(x), **TOL)
    small = create_random("combiner", 16, num_heads=2, window_size=2)
    assert changed_positions(small, rand64(1, 6, 6, 16), (5, 5)).all()


# ---------------------------------------------------------------------------------------------------- shifted_sparse_group


def s2_oracle(m, x):
    """Dense masked attention: group (or half-shifted group, no wrap-around) of each query, plus the sink tokens."""
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    n, g, sinks, heads = tokens.shape[1], m.group_size(tokens.shape[1]), m.num_tokens, m.num_heads
    q, k, v = m.qkv(tokens).reshape(tokens.shape[0], n, 3, heads, -1).unbind(2)
    pos = torch.arange(n)
    out = []
    for head in range(heads):
        offset = 0 if head < heads // 2 else g // 2
        group = (pos + offset) // g
        allowed = (group[:, None] == group[None, :]) | (pos[None, :] < sinks)
        logits = torch.einsum("bnd,bmd->bnm", q[:, :, head], k[:, :, head]) * q.shape[-1] ** -0.5
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(weights @ v[:, :, head])
    return m.proj(torch.stack(out, 2).reshape(tokens.shape)).reshape(x.shape)


@pytest.mark.parametrize("size, window, sinks", [((8, 8), 16, 2), ((5, 7), 6, 3), ((30,), 8, 0)])
def test_shifted_sparse_group_equals_dense_masked_oracle(size, window, sinks):
    ours = create_random("shifted_sparse_group", 16, num_heads=4, window_size=window, num_tokens=sinks)
    x = rand64(2, *size, 16)
    torch.testing.assert_close(ours(x), s2_oracle(ours, x), **TOL)


def test_shifted_sparse_group_one_group_without_sinks_is_mhsa():
    """A group of twice the sequence holds every token in both halves of the heads (the shift is g/2 = N)."""
    ours = create_random("shifted_sparse_group", 16, num_heads=2, window_size=128, num_tokens=0)
    mhsa = attnzoo.create("mhsa", 16, num_heads=2).to(DT).eval()
    mhsa.load_state_dict(ours.state_dict())
    x = rand64(1, 8, 8, 16)
    torch.testing.assert_close(ours(x), mhsa(x), **TOL)
