"""Channel and convolutional mechanisms: external parity, independent formulas, paper properties.

Parity protocol: float64, eval mode, every parameter and BN statistic randomised, explicit key maps.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnzoo

from conftest import nchw, nhwc, rand64, randomize_

TOL = dict(rtol=1e-10, atol=1e-10)


def make(name: str, dim: int, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return attnzoo.create(name, dim, **kwargs).double().eval()


def as_conv(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (out, in) as the weight of a 1×1 Conv2d (out, in, 1, 1)."""
    return weight[:, :, None, None]


def load(target: nn.Module, mapping: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into ``target`` and check that nothing was left unmapped."""
    missing, unexpected = target.load_state_dict(mapping, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    assert not missing and not unexpected, (missing, unexpected)


def receptive_support(module: nn.Module, size: int, dim: int) -> tuple[int, int]:
    """Height and width of the bounding box of input positions that reach the centre output (via autograd)."""
    x = rand64(1, size, size, dim).requires_grad_()
    module(x)[0, size // 2, size // 2].sum().backward()
    rows, cols = torch.nonzero(x.grad.abs().sum(dim=(0, 3)) > 0, as_tuple=True)
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    box = x.grad.abs().sum(dim=(0, 3))[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert (box > 0).all(), "the support has holes"
    return height, width


# ---------------------------------------------------------------------------------------------------------- SE


@pytest.mark.parametrize("dim", [32, 48])
def test_squeeze_excite_matches_timm(dim):
    from timm.layers.squeeze_excite import SEModule

    from attnzoo.interop.timm import squeeze_excite_weights

    ref = randomize_(SEModule(dim, rd_channels=dim // 16).double().eval(), seed=0)
    ours = make("squeeze_excite", dim)
    load(ours, squeeze_excite_weights(ref))
    x = rand64(2, 5, 6, dim)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)


def test_squeeze_excite_matches_torchvision():
    from torchvision.ops import SqueezeExcitation

    ours = randomize_(make("squeeze_excite", 32), seed=0)
    ref = SqueezeExcitation(32, 2).double().eval()
    sd = ours.state_dict()
    load(ref, {k: as_conv(v) if k.endswith("weight") else v for k, v in sd.items()})
    x = rand64(2, 4, 7, 32)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)


def test_squeeze_excite_gate_properties():
    m = randomize_(make("squeeze_excite", 32), std=1.0, seed=0)
    x = rand64(2, 5, 6, 32)
    ratio = m(x) / x
    assert ((ratio > 0) & (ratio < 1)).all()
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio), **TOL)  # constant over H, W
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    torch.testing.assert_close(m(x), x / 2, **TOL)


# ---------------------------------------------------------------------------------------------------------- ECA


@pytest.mark.parametrize(
    "channels, k", [(4, 1), (8, 3), (16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)]
)
def test_eca_adaptive_kernel_size_table(channels, k):
    assert attnzoo.create("eca", channels).kernel_size == k


@pytest.mark.parametrize("dim", [8, 64, 128, 2048])
def test_eca_matches_timm(dim):
    from timm.layers.eca import EcaModule

    ours = randomize_(make("eca", dim), seed=0)
    ref = EcaModule(channels=dim).double().eval()
    load(ref, ours.state_dict())  # same key: conv.weight (1, 1, k)
    x = rand64(2, 3, 4, dim)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)


def test_eca_documented_difference_from_timm_for_four_channels():
    from timm.layers.eca import EcaModule

    assert attnzoo.create("eca", 4).kernel_size == 1
    assert EcaModule(channels=4).conv.kernel_size == (3,)  # timm clamps ψ(C) to at least 3


def test_eca_locality_and_channel_translation_equivariance():
    m = randomize_(make("eca", 64), std=1.0, seed=0)  # k = 3: each gate sees channels c-1..c+1
    x = rand64(2, 4, 4, 64)
    x[..., -1] = 0  # so a one-channel shift only moves zeros through the zero padding
    gate = m(x) / x
    bumped = x.clone()
    bumped[..., 10] += 1.0
    changed = ((m(bumped) / bumped - gate).abs() > 1e-12).flatten(0, 2).any(dim=0)
    assert changed.nonzero().flatten().tolist() == [9, 10, 11]
    shifted = torch.roll(x, 1, dims=-1)
    torch.testing.assert_close(m.gate(shifted)[..., 1:], m.gate(x)[..., :-1], **TOL)
    ratio = m(x) / x
    ok = x != 0
    assert ((ratio[ok] > 0) & (ratio[ok] < 1)).all()


# ---------------------------------------------------------------------------------------------------------- CBAM


@pytest.mark.parametrize("mlp_bias", [True, False])
def test_cbam_matches_timm(mlp_bias):
    from timm.layers.cbam import CbamModule

    from attnzoo.interop.timm import cbam_weights

    ref = CbamModule(32, rd_ratio=1 / 16, spatial_kernel_size=7, mlp_bias=mlp_bias).double()
    randomize_(ref, seed=0).eval()
    ours = make("cbam", 32, mlp_bias=mlp_bias)
    load(ours, cbam_weights(ref))  # ours stacks [avg; max] like timm's [mean, max]
    x = rand64(2, 6, 9, 32)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)
    with torch.no_grad():  # the official code's [max; mean] order would need this flip: the pooled-pair order matters
        ours.spatial_conv.weight.copy_(ours.spatial_conv.weight.flip(1))
    assert (ours(x) - nhwc(ref(nchw(x)))).abs().max() > 1e-3


def test_cbam_gate_properties():
    m = randomize_(make("cbam", 32), std=1.0, seed=0)
    x = rand64(2, 5, 6, 32)
    ratio = m(x) / x
    assert ((ratio > 0) & (ratio < 1)).all()
    singular = torch.linalg.svdvals(ratio.flatten(1, 2))  # (HW × C) per batch: channel gate ⊗ spatial gate
    assert (singular[:, 1] < 1e-10 * singular[:, 0]).all()
    fresh = make("cbam", 32)  # BN at its initial statistics
    with torch.no_grad():
        for p in fresh.parameters():
            if p is not fresh.spatial_norm.weight:
                p.zero_()
    torch.testing.assert_close(fresh(x), x / 4, **TOL)


# ---------------------------------------------------------------------------------------------------------- PSA


def polarized_reference(m: nn.Module, x: torch.Tensor, mode: str, variant: str) -> torch.Tensor:
    """PSA written from the paper / official equations in NCHW matrix form."""

    def conv(layer, t):
        return F.conv2d(t, as_conv(layer.weight), layer.bias)

    def channel_only(t):
        b, c, h, w = t.shape
        wv = conv(m.ch_wv, t).reshape(b, c // 2, h * w)
        wq = torch.softmax(conv(m.ch_wq, t).reshape(b, h * w, 1), dim=1)
        z = conv(m.ch_wz, torch.matmul(wv, wq).unsqueeze(-1)).reshape(b, c)
        if variant == "paper":
            z = F.layer_norm(z, (c,), m.ln.weight, m.ln.bias, m.ln.eps)
        return torch.sigmoid(z).reshape(b, c, 1, 1) * t

    def spatial_only(t):
        b, c, h, w = t.shape
        wv = conv(m.sp_wv, t).reshape(b, c // 2, h * w)
        wq = conv(m.sp_wq, t).mean(dim=(2, 3)).reshape(b, 1, c // 2)
        if variant == "paper":
            wq = torch.softmax(wq, dim=-1)
        z = torch.matmul(wq, wv)
        if variant == "official":
            z = torch.softmax(z, dim=-1)
        return torch.sigmoid(z.reshape(b, 1, h, w)) * t

    t = nchw(x)
    out = channel_only(t) + spatial_only(t) if mode == "parallel" else spatial_only(channel_only(t))
    return nhwc(out)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_polarized_matches_equations(mode, variant):
    m = randomize_(make("polarized", 16, arrangement=mode, variant=variant), seed=0)
    assert (m.ch_wv.bias is None) == (variant == "official")
    x = rand64(2, 5, 7, 16)
    torch.testing.assert_close(m(x), polarized_reference(m, x, mode, variant), **TOL)


def test_polarized_bounds_and_sequential_composition():
    x = rand64(2, 5, 6, 16)
    par = randomize_(make("polarized", 16, arrangement="parallel"), std=1.0, seed=0)
    seq = make("polarized", 16, arrangement="sequential")
    seq.load_state_dict(par.state_dict())
    assert (par(x).abs() <= 2 * x.abs()).all() and (seq(x).abs() <= x.abs()).all()
    # the loaded sequential module is spatial_only(channel_only(x)) of the parallel module's weights
    torch.testing.assert_close(seq(x), polarized_reference(par, x, "sequential", "paper"), **TOL)


# ---------------------------------------------------------------------------------------------------------- ULSAM


def ulsam_paper_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official ULSAM: subspaces processed one at a time with their own layers, plus the identity."""
    groups, t = m.num_groups, nchw(x)
    width = t.shape[1] // groups
    outs = []
    for n, sub in enumerate(t.chunk(groups, dim=1)):
        sl = slice(n * width, (n + 1) * width)
        a = F.conv2d(sub, m.conv_dws.weight[sl], m.conv_dws.bias[sl], groups=width)
        bn = m.bn_dws
        a = F.relu(F.batch_norm(a, bn.running_mean[sl], bn.running_var[sl], bn.weight[sl], bn.bias[sl], eps=bn.eps))
        a = F.max_pool2d(a, 3, stride=1, padding=1)
        a = F.conv2d(a, m.conv_point.weight[n : n + 1], m.conv_point.bias[n : n + 1])
        bn = m.bn_point
        sn = slice(n, n + 1)
        a = F.relu(F.batch_norm(a, bn.running_mean[sn], bn.running_var[sn], bn.weight[sn], bn.bias[sn], eps=bn.eps))
        a = torch.softmax(a.flatten(2), dim=-1).view_as(a)
        outs.append(a * sub + sub)
    return nhwc(torch.cat(outs, dim=1))


def test_ulsam_matches_official_subspace_loop_plus_identity():
    m = randomize_(make("ulsam", 16, num_groups=4), std=1.0, seed=0)
    x = rand64(2, 5, 7, 16)
    torch.testing.assert_close(m(x) + x, ulsam_paper_reference(m, x), **TOL)


def test_ulsam_properties():
    m = randomize_(make("ulsam", 16, num_groups=4), std=1.0, seed=0)
    x = rand64(2, 5, 6, 16)
    maps = m.attention_maps(x)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 4, dtype=torch.float64), **TOL)
    bumped = x.clone()
    bumped[..., :4] += rand64(2, 5, 6, 4, seed=7)  # group 0 only
    torch.testing.assert_close(m(bumped)[..., 4:], m(x)[..., 4:], **TOL)
    assert (m(bumped)[..., :4] - m(x)[..., :4]).abs().max() > 1e-6
    constant = rand64(2, 1, 1, 16).expand(2, 5, 6, 16)
    torch.testing.assert_close(m(constant), constant / 30, **TOL)
    no_norm = make("ulsam", 16, norm=False)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in no_norm.modules())


def test_ulsam_batchnorm_momentum_follows_official_code():
    m = make("ulsam", 8, num_groups=2).train()
    x = rand64(4, 5, 5, 8)
    m(x)
    t = m.conv_dws(nchw(x))
    expected = 0.9 * t.mean(dim=(0, 2, 3))  # running = (1 - 0.9)·0 + 0.9·batch
    torch.testing.assert_close(m.bn_dws.running_mean, expected.detach(), **TOL)


# ---------------------------------------------------------------------------------------------------------- ELA


def ela_paper_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ELA from its equations: explicit conv taps and a hand-written GroupNorm on the pooled strips."""
    weight, groups = m.conv.weight, m.conv.groups
    k, num_norm_groups = weight.shape[-1], m.norm.num_groups

    def gate(strip):  # (B, C, L)
        b, c, length = strip.shape
        taps = F.pad(strip, (k // 2, k // 2)).unfold(2, k, 1)  # (B, C, L, k): taps[..., l, t] = x[l + t − k//2]
        taps = taps.reshape(b, groups, c // groups, length, k)
        out = torch.einsum("goit,bgilt->bgol", weight.reshape(groups, c // groups, c // groups, k), taps)
        out = out.reshape(b, c, length)
        grouped = out.reshape(b, num_norm_groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        var = grouped.var(dim=-1, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + m.norm.eps)).reshape(b, c, length)
        return torch.sigmoid(normed * m.norm.weight[:, None] + m.norm.bias[:, None])

    t = nchw(x)
    a_h = gate(t.mean(dim=3))[..., :, None]
    a_w = gate(t.mean(dim=2))[..., None, :]
    return nhwc(t * a_h * a_w)


@pytest.mark.parametrize("variant", ["T", "B", "S", "L"])
def test_efficient_local_matches_paper_formula(variant):
    m = randomize_(make("efficient_local", 32, variant=variant), std=1.0, seed=0)
    expected_k, expected_groups = {"T": (5, 32), "B": (7, 32), "S": (5, 4), "L": (7, 4)}[variant]
    assert m.conv.kernel_size == (expected_k,) and m.conv.groups == expected_groups
    assert m.norm.num_groups == (32 if variant == "T" else 16)
    x = rand64(2, 6, 9, 32)
    torch.testing.assert_close(m(x), ela_paper_reference(m, x), **TOL)


def test_efficient_local_timm_deviation_is_groupnorm1_and_silu():
    from timm.layers.coord_attn import EfficientLocalAttn

    ours = randomize_(make("efficient_local", 32, variant="B"), std=1.0, seed=0)
    ref = EfficientLocalAttn(32, kernel_size=7).double().eval()
    w = ours.conv.weight  # (C, 1, 7), shared by both strips in the paper
    load(
        ref,
        {
            "conv_h.weight": w[..., :, None],
            "conv_w.weight": w[..., None, :],
            "norm_h.weight": ours.norm.weight,
            "norm_h.bias": ours.norm.bias,
            "norm_w.weight": ours.norm.weight,
            "norm_w.bias": ours.norm.bias,
        },
    )
    x = rand64(2, 6, 9, 32)
    assert (nhwc(ref(nchw(x))) - ours(x)).abs().max() > 1e-2  # timm ≠ paper with the very same weights
    ref.norm_h, ref.norm_w, ref.act = ours.norm, ours.norm, nn.Identity()
    torch.testing.assert_close(nhwc(ref(nchw(x))), ours(x), **TOL)  # ... and the difference is exactly GN(1) + SiLU


def test_efficient_local_properties():
    m = randomize_(make("efficient_local", 32, variant="T"), std=1.0, seed=0)
    x = rand64(2, 7, 7, 32)
    ratio = (m(x) / x).permute(0, 3, 1, 2)  # (B, C, H, W) gate
    singular = torch.linalg.svdvals(ratio)
    assert (singular[..., 1] < 1e-10 * singular[..., 0]).all()  # rank-1 per channel
    torch.testing.assert_close(m(x.transpose(1, 2)), m(x).transpose(1, 2), **TOL)
    constant = rand64(2, 1, 1, 32).expand(2, 12, 12, 32)
    inner = (m(constant) / constant)[:, 2:-2, 2:-2]  # k = 5: uniform where the zero padding is out of reach
    torch.testing.assert_close(inner, inner[:, :1, :1].expand_as(inner), **TOL)


# ---------------------------------------------------------------------------------------------------------- LKA


def test_large_kernel_receptive_field_is_23():
    m = randomize_(make("large_kernel", 4), std=1.0, seed=0)
    assert m.receptive_field == 23
    assert receptive_support(m, 31, 4) == (23, 23)
    plain = randomize_(make("large_kernel", 4, kernel_size=35, dilation=5, projections=False), std=1.0, seed=0)
    assert plain.receptive_field == 9 + 6 * 5 == 39 and receptive_support(plain, 45, 4) == (39, 39)


def test_large_kernel_matches_van_attention_minus_shortcut():
    m = randomize_(make("large_kernel", 8), seed=0)
    x = rand64(2, 11, 12, 8)
    t = nchw(x)
    u = F.gelu(F.conv2d(t, m.proj_1.weight, m.proj_1.bias))
    attn = F.conv2d(u, m.conv0.weight, m.conv0.bias, padding=2, groups=8)
    attn = F.conv2d(attn, m.conv_spatial.weight, m.conv_spatial.bias, padding=9, dilation=3, groups=8)
    attn = F.conv2d(attn, m.conv1.weight, m.conv1.bias)
    van = F.conv2d(u * attn, m.proj_2.weight, m.proj_2.bias) + t  # VAN SpatialAttention with its shortcut
    torch.testing.assert_close(m(x) + x, nhwc(van), **TOL)


def test_large_kernel_identity_kernels_square_the_input_and_translation_equivariance():
    m = make("large_kernel", 4, projections=False)
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial):
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1
            conv.bias.zero_()
        m.conv1.weight.copy_(torch.eye(4)[:, :, None, None])
        m.conv1.bias.zero_()
    x = rand64(1, 6, 7, 4)
    torch.testing.assert_close(m(x), x * x, **TOL)
    full = randomize_(make("large_kernel", 4), std=1.0, seed=0)
    x = rand64(1, 40, 40, 4)
    shifted = torch.roll(x, (3, 2), dims=(1, 2))
    # away from the zero padding (11 on each side of the 23×23 field) a shift of the input shifts the output
    torch.testing.assert_close(full(shifted)[:, 14:-11, 13:-11], full(x)[:, 11:-14, 11:-13], **TOL)


# ---------------------------------------------------------------------------------------------------------- GCNet


@pytest.mark.parametrize("fusion", ["add", "mul"])
@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_global_context_matches_timm(fusion, pooling):
    from timm.layers.global_context import GlobalContext

    from attnzoo.interop.timm import global_context_weights

    ref = randomize_(
        GlobalContext(
            32, use_attn=pooling == "att", fuse_add=fusion == "add", fuse_scale=fusion == "mul", rd_ratio=1 / 16
        )
        .double()
        .eval(),
        seed=0,
    )
    ours = make("global_context", 32, fusion=fusion, pooling=pooling)
    prefix = "mlp_add" if fusion == "add" else "mlp_scale"
    getattr(ref, prefix).norm.eps = ours.norm.eps  # timm's LayerNorm2d uses 1e-6, the official code 1e-5
    load(ours, global_context_weights(ref))
    x = rand64(2, 5, 7, 32)
    paper = ours(x) + x if fusion == "add" else ours(x)  # 'add': GCNet's output is x + ours
    torch.testing.assert_close(paper, nhwc(ref(nchw(x))), **TOL)


def test_global_context_properties():
    x = rand64(2, 5, 6, 32)
    fresh = make("global_context", 32)
    torch.testing.assert_close(fresh(x), torch.zeros_like(x), rtol=0, atol=0)  # zero-initialised W₂
    torch.testing.assert_close(make("global_context", 32, fusion="mul")(x), x / 2, **TOL)
    m = randomize_(make("global_context", 32), seed=0)
    y = m(x)
    torch.testing.assert_close(y, y[:, :1, :1].expand_as(y), **TOL)  # constant over H, W
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = x.flatten(1, 2)[:, perm].view_as(x)
    torch.testing.assert_close(m(shuffled), y, **TOL)  # invariant to permuting positions


# ---------------------------------------------------------------------------------------------------------- HorNet


def hornet_global_local_filter(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HorNet-GF's GlobalLocalFilter in its own layout: NCHW, weights (C/2, h, w, 2), channels_first LayerNorms."""

    def channels_first_ln(norm, t):
        mean = t.mean(1, keepdim=True)
        var = (t - mean).pow(2).mean(1, keepdim=True)
        return norm.weight[:, None, None] * (t - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]

    t = channels_first_ln(f.pre_norm, x)
    x1, x2 = torch.chunk(t, 2, dim=1)
    x1 = F.conv2d(x1, f.dw.weight, padding=1, groups=x1.shape[1])
    b, c, a, w = x2.shape
    x2 = torch.fft.rfft2(x2, dim=(2, 3), norm="ortho")
    weight = f.global_filter.complex_weight.permute(2, 0, 1, 3)  # official layout (C, h, w, 2)
    if weight.shape[1:3] != x2.shape[2:4]:
        weight = F.interpolate(weight.permute(3, 0, 1, 2), size=x2.shape[2:4], mode="bilinear", align_corners=True)
        weight = weight.permute(1, 2, 3, 0)
    x2 = torch.fft.irfft2(x2 * torch.view_as_complex(weight.contiguous()), s=(a, w), dim=(2, 3), norm="ortho")
    t = torch.cat([x1.unsqueeze(2), x2.unsqueeze(2)], dim=2).reshape(b, 2 * c, a, w)
    return channels_first_ln(f.post_norm, t)


def gnconv_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gⁿConv from the HorNet equations, with the widths written out."""
    n, c = m.order, x.shape[-1]
    widths = [c // 2 ** (n - 1 - k) for k in range(n)]
    fused = F.conv2d(nchw(x), m.proj_in.weight, m.proj_in.bias)
    p, q = fused[:, : widths[0]], fused[:, widths[0] :]
    if m.dw == "gf":
        q = m.scale * hornet_global_local_filter(m.dwconv, q)
    else:
        q = m.scale * F.conv2d(q, m.dwconv.weight, m.dwconv.bias, padding=m.kernel_size // 2, groups=q.shape[1])
    starts = [sum(widths[:k]) for k in range(n)]
    p = p * q[:, starts[0] : starts[0] + widths[0]]
    for k in range(1, n):
        p = F.conv2d(p, m.pws[k - 1].weight, m.pws[k - 1].bias) * q[:, starts[k] : starts[k] + widths[k]]
    return nhwc(F.conv2d(p, m.proj_out.weight, m.proj_out.bias))


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_recursive_gated_conv_matches_equations_and_is_homogeneous(order):
    m = randomize_(make("recursive_gated_conv", 16, order=order), seed=0)
    assert m.dims[-1] == 16 and sum(m.dims) + m.dims[0] == 32
    x = rand64(2, 6, 9, 16)
    torch.testing.assert_close(m(x), gnconv_reference(m, x), **TOL)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    torch.testing.assert_close(m(1.7 * x), 1.7 ** (order + 1) * m(x), **TOL)
    assert not torch.allclose(m(1.7 * x), 1.7**order * m(x))


@pytest.mark.parametrize("size", [(7, 9), (14, 14)])
def test_recursive_gated_conv_global_filter_variant(size):
    m = randomize_(make("recursive_gated_conv", 16, order=3, dw="gf", filter_size=(14, 8)), seed=0)
    x = rand64(1, *size, 16)
    torch.testing.assert_close(m(x), gnconv_reference(m, x), **TOL)
    assert receptive_support(m, 9, 16) == (9, 9)  # global: every position reaches the centre


def test_recursive_gated_conv_first_order_is_a_gated_conv_and_field_is_7x7():
    m = randomize_(make("recursive_gated_conv", 8, order=1), seed=0)
    x = rand64(1, 6, 6, 8)
    p, q = F.conv2d(nchw(x), m.proj_in.weight, m.proj_in.bias).chunk(2, dim=1)
    gated = p * F.conv2d(q, m.dwconv.weight, m.dwconv.bias, padding=3, groups=8) / 3
    torch.testing.assert_close(m(x), nhwc(F.conv2d(gated, m.proj_out.weight, m.proj_out.bias)), **TOL)
    assert receptive_support(randomize_(make("recursive_gated_conv", 8, order=3), seed=0), 13, 8) == (7, 7)


# ---------------------------------------------------------------------------------------------------------- SMT


def smt_official_structure(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SMT's ca_attention=1 forward on (B, N, C) tokens: head loop and reshape/concat interleave as in the code."""
    b, h, w, c = x.shape
    heads = m.ca_num_heads
    tokens = x.reshape(b, h * w, c)
    v = F.linear(tokens, m.v.weight, m.v.bias)
    s = F.linear(tokens, m.s.weight, m.s.bias).reshape(b, h, w, heads, c // heads).permute(3, 0, 4, 1, 2)
    pieces = []
    for i in range(heads):
        conv = m.local_convs[i]
        mixed = F.conv2d(s[i], conv.weight, conv.bias, padding=1 + i, groups=c // heads)
        pieces.append(mixed.reshape(b, c // heads, 1, h, w))
    s_out = torch.cat(pieces, dim=2).reshape(b, c, h, w)
    s_out = F.conv2d(s_out, m.proj0.weight, m.proj0.bias, groups=c // heads)
    bn = m.bn
    s_out = F.gelu(F.batch_norm(s_out, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
    s_out = F.conv2d(s_out, m.proj1.weight, m.proj1.bias).reshape(b, c, h * w).permute(0, 2, 1)
    return F.linear(s_out * v, m.proj.weight, m.proj.bias).reshape(b, h, w, c)


def test_scale_aware_modulation_matches_official_structure():
    m = randomize_(make("scale_aware_modulation", 16, qkv_bias=True), seed=0)
    x = rand64(2, 5, 7, 16)
    torch.testing.assert_close(m(x), smt_official_structure(m, x), **TOL)


def test_scale_aware_modulation_properties():
    m = randomize_(make("scale_aware_modulation", 16), std=1.0, seed=0)
    assert m.receptive_field == 9 and receptive_support(m, 15, 16) == (9, 9)
    x = rand64(2, 5, 6, 16)
    with torch.no_grad():
        m.v.weight.zero_()
    torch.testing.assert_close(m(x), m.proj.bias.expand_as(x), **TOL)
    outputs = {}
    m.proj0.register_forward_hook(lambda mod, inp, out: outputs.__setitem__("proj0", out))
    m(x)
    plain = outputs["proj0"]
    bump = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    bump[0, 1] = 1.0  # channel 1 of head 2 → interleaved channel 1·4 + 2 = 6, inside proj0 group 1 (outputs 8..15)
    handle = m.local_convs[2].register_forward_hook(lambda mod, inp, out: out + bump)
    m(x)
    handle.remove()
    changed = ((outputs["proj0"] - plain).abs().amax(dim=(0, 2, 3)) > 1e-12).nonzero().flatten().tolist()
    assert changed == list(range(8, 16))


# ---------------------------------------------------------------------------------------------------------- GFNet


def circular_kernel(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Spatial kernel (H, W, C) of the filter (H, W//2+1, C, 2), summed from the inverse DFT definition.

    The half spectrum stands for a Hermitian full spectrum: columns 0 (and W/2 for even W) once, the others twice,
    real part taken; the two 'ortho' scalings together give 1/(H·W).
    """
    spectrum = torch.complex(weight[..., 0], weight[..., 1])  # (H, Wf, C)
    a = torch.arange(height, dtype=torch.float64)
    b = torch.arange(width, dtype=torch.float64)
    k1 = torch.arange(height, dtype=torch.float64)
    k2 = torch.arange(spectrum.shape[1], dtype=torch.float64)
    count = torch.full_like(k2, 2.0)
    count[0] = 1.0
    if width % 2 == 0:
        count[-1] = 1.0
    phase_h = torch.exp(2j * math.pi * torch.outer(a, k1) / height)  # (a, k1)
    phase_w = torch.exp(2j * math.pi * torch.outer(b, k2) / width) * count  # (b, k2)
    kernel = torch.einsum("ak,bl,klc->abc", phase_h, phase_w.to(torch.complex128), spectrum)
    return kernel.real / (height * width)


@pytest.mark.parametrize("size", [(7, 5), (6, 8), (5, 6)])
def test_spectral_gating_is_a_circular_convolution(size):
    height, width = size
    m = make("spectral_gating", 3, input_resolution=size)
    assert m.filter_size == (height, width // 2 + 1)
    randomize_(m, std=1.0, seed=0)
    x = rand64(2, height, width, 3)
    kernel = circular_kernel(m.complex_weight, height, width)
    expected = sum(
        kernel[a, b] * torch.roll(x, (a, b), dims=(1, 2)) for a in range(height) for b in range(width)
    )  # y[p] = Σ_s K[s] x[p − s]
    torch.testing.assert_close(m(x), expected, **TOL)


@pytest.mark.parametrize("size", [(8, 8), (7, 5), (9, 13)])
def test_spectral_gating_unit_filter_is_identity_and_linear(size):
    m = make("spectral_gating", 4)  # default 14×8 filter, resized to every size
    x, x2 = rand64(2, *size, 4), rand64(2, *size, 4, seed=2)
    torch.testing.assert_close(m(2.5 * x - x2), 2.5 * m(x) - m(x2), **TOL)
    with torch.no_grad():
        m.complex_weight[..., 0] = 1.0
        m.complex_weight[..., 1] = 0.0
    torch.testing.assert_close(m(x), x, **TOL)


def test_spectral_gating_resizes_bilinearly_with_aligned_corners():
    m = randomize_(make("spectral_gating", 2, filter_size=(3, 2)), std=1.0, seed=0)
    w = m.complex_weight  # (3, 2, C, 2) → needed (5, 4) for a 5×6 input: source index = i·(in−1)/(out−1)
    expected = torch.empty(5, 4, 2, 2, dtype=torch.float64)
    for i in range(5):
        for j in range(4):
            si, sj = i * 2 / 4, j * 1 / 3
            i0, j0 = min(int(si), 1), min(int(sj), 0)
            fi, fj = si - i0, sj - j0
            expected[i, j] = (
                (1 - fi) * (1 - fj) * w[i0, j0]
                + (1 - fi) * fj * w[i0, j0 + 1]
                + fi * (1 - fj) * w[i0 + 1, j0]
                + fi * fj * w[i0 + 1, j0 + 1]
            )
    torch.testing.assert_close(m.spectral_filter(5, 6), expected, **TOL)
    torch.testing.assert_close(m.spectral_filter(3, 2), w, rtol=0, atol=0)


def test_spectral_gating_low_precision_runs_in_float32():
    m = randomize_(make("spectral_gating", 4, input_resolution=(6, 7)), std=1.0, seed=0).to(torch.bfloat16)
    x = rand64(1, 6, 7, 4).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    # the same bf16 input and weights, transformed in float32 and rounded once at the end
    w = m.complex_weight.float()
    spectrum = torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho") * torch.complex(w[..., 0], w[..., 1])
    expected = torch.fft.irfft2(spectrum, s=(6, 7), dim=(1, 2), norm="ortho")
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0)
    resized = make("spectral_gating", 4).to(torch.bfloat16)(x)  # default 14×8 filter resized to 6×7
    assert resized.dtype == torch.bfloat16 and torch.isfinite(resized).all()


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, dim, kwargs, needle",
    [
        ("squeeze_excite", 32, {"reduction": 0}, "reduction=0"),
        ("eca", 32, {"kernel_size": 4}, "kernel_size=4"),
        ("cbam", 32, {"spatial_kernel_size": 6}, "spatial_kernel_size=6"),
        ("polarized", 16, {"arrangement": "both"}, "arrangement='both'"),
        ("polarized", 16, {"variant": "v2"}, "variant='v2'"),
        ("ulsam", 30, {"num_groups": 4}, "dim=30"),
        ("efficient_local", 24, {"variant": "B"}, "dim=24"),
        ("efficient_local", 32, {"variant": "X"}, "variant='X'"),
        ("large_kernel", 16, {"kernel_size": 20, "dilation": 5}, "kernel_size=20"),
        ("global_context", 32, {"fusion": "cat"}, "fusion='cat'"),
        ("global_context", 32, {"pooling": "max"}, "pooling='max'"),
        ("recursive_gated_conv", 12, {"order": 4}, "dim=12"),
        ("recursive_gated_conv", 8, {"order": 4, "dw": "gf"}, "dim=8"),
        ("recursive_gated_conv", 16, {"dw": "fft"}, "dw='fft'"),
        ("scale_aware_modulation", 18, {"ca_num_heads": 4}, "dim=18"),
        ("spectral_gating", 8, {"filter_size": (4, 4), "input_resolution": (8, 8)}, "filter_size=(4, 4)"),
    ],
)
def test_bad_arguments_are_named(name, dim, kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        attnzoo.create(name, dim, **kwargs)


def test_channels_last_input_is_checked():
    with pytest.raises(ValueError, match="dim=32"):
        attnzoo.create("cbam", 32)(torch.randn(1, 4, 4, 16))
