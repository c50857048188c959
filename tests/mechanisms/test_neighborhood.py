"""Parity and properties of the Tier-2 local and sparse patterns (tier2.md §A).

References are pip classes with copied weights (timm, transformers) or oracles/equivalences written here from the
definitions; float64, eval mode, every parameter randomised.
"""

from __future__ import annotations

import math

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


def partition(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nW, m·m, C)`` windows, image-major (timm's ``window_partition``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, c)


def unpartition(windows: torch.Tensor, m: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    return windows.reshape(-1, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def changed_positions(module, x, position, eps=1.0):
    """Boolean spatial map of outputs that change when the token at ``position`` of image 0 is perturbed."""
    y0 = module(x)
    x1 = x.clone()
    x1[(0, *position)] += eps
    return (module(x1) - y0).abs().amax(-1)[0] > 1e-12


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
    ours = make("window_v2", 16, num_heads=2, window_size=4)
    with torch.no_grad():
        ours.logit_scale.copy_(torch.tensor([[[0.3]], [[5.0]]]))  # the second is clamped at log(100)
    ref = timm_swin_v2(ours)
    x = rand(2, 8, 12, 16)
    expected = unpartition(ref(partition(x, 4)), 4, 8, 12)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_window_v2_shifted_matches_timm_with_roll_and_region_mask():
    m, s = 4, 2
    ours = make("window_v2", 16, num_heads=2, window_size=m, shift_size=s)
    ref = timm_swin_v2(ours)
    x = rand(2, 8, 8, 16)
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
    ours = make("window_v2", 16, num_heads=2, window_size=4)
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(7.0))
        ours.cpb_mlp[-1].weight.zero_()  # σ(0)·16 = 8 on every offset: a constant, softmax-invariant
    x = rand(1, 8, 8, 16)
    bias = torch.cat((ours.q_bias, torch.zeros_like(ours.q_bias), ours.v_bias))
    q, k, v = F.linear(partition(x, 4), ours.qkv.weight, bias).reshape(-1, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = 7.0 * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, 16, 16)
    torch.testing.assert_close(ours(x), unpartition(ours.proj(out), 4, 8, 8), **TOL)


# ---------------------------------------------------------------------------------------------------- non_local


@pytest.mark.parametrize("train", [False, True])
def test_non_local_matches_timm_non_local_attn_minus_its_shortcut(train):
    from timm.layers import NonLocalAttn

    ours = make("non_local", 16, reduction=2)
    ref = NonLocalAttn(16, rd_channels=8).to(DT)
    state = {
        k: (v[..., None, None] if k[0] in "tpgz" and k.endswith("weight") else v) for k, v in ours.state_dict().items()
    }
    ref.load_state_dict(state)
    ours.train(train)
    ref.train(train)
    x = rand(2, 5, 6, 16)
    expected = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x
    torch.testing.assert_close(ours(x), expected, **TOL)


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

    ours = make("mask_unit", 16, num_heads=2, window_size=4, q_stride=stride)
    ref = MaskUnitAttention(16, 16, 2, q_stride=stride**2, window_size=(4 // stride) ** 2, use_mask_unit_attn=True)
    ref = ref.to(DT).eval()
    ref.fused_attn = False
    ref.load_state_dict(ours.state_dict())
    x = rand(2, 8, 12, 16)
    expected = hiera_roll_back(ref(hiera_unroll(x, 4, stride)), 8, 12, 4, stride)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_mask_unit_perturbation_stays_in_its_unit_and_padding_is_masked():
    ours = make("mask_unit", 16, num_heads=2, window_size=4)
    x = rand(1, 6, 7, 16)
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

    ours = make("global_context_vit", 16, num_heads=2, window_size=window, levels=levels)
    gen = FeatureBlock(16, levels).to(DT).eval()
    gen.load_state_dict(
        {k[len("global_block.") :]: v for k, v in ours.state_dict().items() if k.startswith("global_block.")}
    )
    attn = WindowAttentionGlobal(16, 2, (window, window)).to(DT).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("global_block.")}
    state["rel_pos.relative_position_bias_table"] = state.pop("relative_position_bias_table")
    attn.load_state_dict(state)
    x = rand(2, *size, 16)
    h, w = size
    q_global = gen(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = unpartition(attn(partition(x, window), q_global), window, h, w)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_global_context_vit_every_output_depends_on_every_token():
    ours = make("global_context_vit", 16, num_heads=2, window_size=4, levels=1)
    x = rand(1, 8, 8, 16)
    assert changed_positions(ours, x, (7, 7)).all()


# ---------------------------------------------------------------------------------------------------- deformable


@pytest.mark.parametrize("size", [(6, 7), (8, 8)])
def test_deformable_matches_transformers_deformable_detr_attention_at_one_level(size):
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr.configuration_deformable_detr import (
        DeformableDetrConfig,
    )
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    ours = make("deformable", 16, num_heads=2, num_points=3)
    with torch.no_grad():
        ours.sampling_offsets.weight.mul_(4)  # offsets of several pixels, many outside the map
    config = DeformableDetrConfig(d_model=16, num_feature_levels=1, disable_custom_kernels=True)
    ref = DeformableDetrMultiscaleDeformableAttention(config, num_heads=2, n_points=3).to(DT).eval()
    ref.load_state_dict(ours.state_dict())
    h, w = size
    x = rand(2, h, w, 16)
    tokens = x.reshape(2, h * w, 16)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    reference_points = torch.stack(((xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h), -1)[None, :, None].expand(
        2, -1, 1, 2
    )
    expected, _ = ref(
        tokens, encoder_hidden_states=tokens, reference_points=reference_points, spatial_shapes=torch.tensor([[h, w]]),
        spatial_shapes_list=[(h, w)], level_start_index=torch.tensor([0]),
    )  # fmt: skip
    torch.testing.assert_close(ours(x), expected.reshape(2, h, w, 16), **TOL)


def test_deformable_integer_offsets_sample_exact_tokens():
    """Offset weights zero and integer biases: each head reads the value at a fixed displacement (zero outside)."""
    ours = make("deformable", 8, num_heads=2, num_points=1)
    with torch.no_grad():
        ours.sampling_offsets.weight.zero_()
        ours.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -2.0]))  # head 0: x+1; head 1: y-2
    x = rand(1, 5, 6, 8)
    value = ours.value_proj(x).reshape(1, 5, 6, 2, 4)
    expected = torch.zeros_like(value)
    expected[:, :, :-1, 0] = value[:, :, 1:, 0]
    expected[:, 2:, :, 1] = value[:, :-2, :, 1]
    torch.testing.assert_close(ours(x), ours.output_proj(expected.reshape(1, 5, 6, 8)), **TOL)


# ---------------------------------------------------------------------------------------------------- factorization, mixture_of_sparse


def neighborhood_like(source, **kwargs):
    target = attnzoo.create("neighborhood", source.dim, rel_pos_bias=False, **kwargs).to(DT).eval()
    target.load_state_dict(source.state_dict())
    return target


def test_factorization_with_one_group_is_neighborhood():
    ours = make("factorization", 16, kernel_size=3, dilation=(2,), num_heads=2)
    x = rand(2, 9, 8, 16)
    torch.testing.assert_close(ours(x), neighborhood_like(ours, num_heads=2, kernel_size=3, dilation=2)(x), **TOL)


def test_mixture_of_sparse_with_equal_groups_is_neighborhood():
    ours = make("mixture_of_sparse", 16, kernel_size=(5, 5), num_heads=4)
    x = rand(2, 7, 9, 16)
    torch.testing.assert_close(ours(x), neighborhood_like(ours, num_heads=4, kernel_size=5)(x), **TOL)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("factorization", dict(kernel_size=3, dilation=(1, 3))),
        ("mixture_of_sparse", dict(kernel_size=(3, (5, 7)))),
    ],
)
def test_head_groups_each_equal_the_neighborhood_of_their_own_geometry(name, kwargs):
    """Output heads of group g (before the projection) equal a neighborhood module with group g's geometry."""
    ours = make(name, 16, num_heads=4, **kwargs)
    x = rand(1, 11, 10, 16)
    q, k, v = ours.qkv(x).reshape(1, 11, 10, 3, 4, 4).unbind(3)
    from attnzoo.ops import neighborhood_attention

    heads = neighborhood_attention(q, k, v, ours.kernel_size, dilation=ours.dilation, head_groups=ours.head_groups)
    for g, (kk, dd) in enumerate(zip(ours.kernel_size, ours.dilation)):
        sl = slice(2 * g, 2 * g + 2)
        alone = neighborhood_attention(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], kk, dilation=dd, backend="reference"
        )
        torch.testing.assert_close(heads[..., sl, :], alone, **TOL)
    torch.testing.assert_close(ours(x), ours.proj(heads.reshape(1, 11, 10, 16)), **TOL)


def test_factorization_receptive_field_is_the_union_of_its_groups_neighborhoods():
    from attnzoo.ops import neighborhood_mask

    ours = make("factorization", 16, kernel_size=3, dilation=(1, 3), num_heads=2)
    x = rand(1, 12, 12, 16)
    key = 6 * 12 + 6
    near, far = neighborhood_mask((12, 12), 3, dilation=1)[:, key], neighborhood_mask((12, 12), 3, dilation=3)[:, key]
    assert (far & ~near).any() and (near & ~far).any()
    assert torch.equal(changed_positions(ours, x, (6, 6)), (near | far).reshape(12, 12))


def test_grouped_mechanisms_reject_bad_groups():
    with pytest.raises(ValueError, match="num_heads=3 must be divisible"):
        attnzoo.create("factorization", 24, dilation=(1, 2), num_heads=3)
    with pytest.raises(TypeError, match="kernel_size=5"):
        attnzoo.create("mixture_of_sparse", 32, kernel_size=5)


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
    ours = make("sparse_global", 16, num_heads=2, activation=activation, bias=True)
    x = rand(2, 5, 7, 16)
    torch.testing.assert_close(ours(x), sparse_gsa_oracle(ours, x, activation), **TOL)


def test_sparse_global_is_global_and_relu_drops_anticorrelated_channels():
    ours = make("sparse_global", 16, num_heads=2)
    x = rand(1, 6, 6, 16)
    assert changed_positions(ours, x, (5, 5)).all()
    with torch.no_grad():
        ours.temperature.fill_(-1e3)  # flips the sign: only anti-correlated channel pairs keep a weight
    qkv = ours.qkv_dwconv(ours.qkv(x.permute(0, 3, 1, 2)))
    q = F.normalize(qkv[:, :16].reshape(1, 2, 8, 36), dim=-1)
    k = F.normalize(qkv[:, 16:32].reshape(1, 2, 8, 36), dim=-1)
    kept = (q @ k.transpose(-1, -2) * -1e3) > 0
    assert 0 < kept.float().mean() < 1  # a sparse map: some weights are exactly zero
    torch.testing.assert_close(ours(x), sparse_gsa_oracle(ours, x, "relu"), **TOL)


# ---------------------------------------------------------------------------------------------------- dynamic_local


def dynamic_conv_oracle(m, x):
    """IDynamicDWConvBlock by im2col: out[c, p] = Σ_o kernel[c // head_dim, o, p] · unfold(z)[c, o, p]."""
    k, g = m.kernel_size, m.num_heads
    z = m.conv0(x.permute(0, 3, 1, 2))
    b, c, h, w = z.shape
    kernels = m.hyper(z).reshape(b, g, 1, k * k, h * w).expand(b, g, c // g, k * k, h * w).reshape(b, c, k * k, h * w)
    patches = F.unfold(z, k, padding=k // 2).reshape(b, c, k * k, h * w)
    out = (kernels * patches).sum(2).reshape(b, c, h, w)
    return m.conv1(out).permute(0, 2, 3, 1)


def test_dynamic_local_matches_im2col_oracle():
    ours = make("dynamic_local", 16, kernel_size=5, num_heads=4)
    x = rand(2, 6, 9, 16)
    torch.testing.assert_close(ours(x), dynamic_conv_oracle(ours, x), **TOL)


def test_dynamic_local_with_constant_kernels_is_a_grouped_depthwise_conv():
    ours = make("dynamic_local", 16, kernel_size=3, num_heads=4)
    with torch.no_grad():
        ours.hyper[-1].weight.zero_()  # the kernels are now the bias: the same at every pixel
    x = rand(1, 7, 7, 16)
    static = ours.hyper[-1].bias.reshape(4, 1, 3, 3).repeat_interleave(4, dim=0)
    z = F.conv2d(ours.conv0(x.permute(0, 3, 1, 2)), static, padding=1, groups=16)
    torch.testing.assert_close(ours(x), ours.conv1(z).permute(0, 2, 3, 1), **TOL)


def test_dynamic_local_receptive_field():
    ours = make("dynamic_local", 16, kernel_size=3, num_heads=4)
    x = rand(1, 9, 9, 16)
    changed = changed_positions(ours, x, (4, 4))
    # output p reads z in the 3x3 window of p, with a kernel computed from the same window (the hyper-network's
    # depthwise conv): a 3x3 receptive field
    assert changed[3:6, 3:6].all() and changed.sum() == 9


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
    ours = make("combiner", 16, num_heads=2, window_size=(2, 3))
    x = rand(2, 4, 6, 16)
    torch.testing.assert_close(ours(x), combiner_oracle(ours, x), **TOL)


def test_combiner_on_a_padded_grid_equals_the_oracle_with_clipped_border_windows():
    """5x7 with 3x3 windows: padded tokens must stay out of the direct keys, the max-pools and the summaries."""
    ours = make("combiner", 16, num_heads=2, window_size=3)
    x = rand(1, 5, 7, 16)
    torch.testing.assert_close(ours(x), combiner_oracle(ours, x), **TOL)


def test_combiner_single_window_is_mhsa_and_every_token_is_reached():
    ours = make("combiner", 16, num_heads=2, window_size=6)
    x = rand(1, 6, 6, 16)
    mhsa = attnzoo.create("mhsa", 16, num_heads=2).to(DT).eval()
    mhsa.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), mhsa(x), **TOL)
    small = make("combiner", 16, num_heads=2, window_size=2)
    assert changed_positions(small, rand(1, 6, 6, 16), (5, 5)).all()


# ---------------------------------------------------------------------------------------------------- gated_cross_neighborhood


def test_gated_cross_neighborhood_on_one_stream_is_gated_neighborhood_self_attention():
    ours = make("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3, dilation=2)
    nat = attnzoo.create("neighborhood", 16, num_heads=2, kernel_size=3, dilation=2).to(DT).eval()
    state = ours.state_dict()
    nat.load_state_dict({
        "qkv.weight": torch.cat([state[f"embed_{n}.weight"] for n in "qkv"]),
        "qkv.bias": torch.cat([state[f"embed_{n}.bias"] for n in "qkv"]),
        "proj.weight": state["proj.weight"], "proj.bias": state["proj.bias"], "rpb": state["rpb"],
    })  # fmt: skip
    x = rand(2, 7, 9, 16)
    t = torch.tanh(ours.gate)
    torch.testing.assert_close(ours(x), (1 - t) * x + t * nat(x), **TOL)
    torch.testing.assert_close(ours(x, x), ours(x), **TOL)


def test_gated_cross_neighborhood_queries_come_from_x_and_keys_from_context():
    from attnzoo.ops import neighborhood_mask

    ours = make("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3)
    x, context = rand(1, 7, 7, 16), rand(1, 7, 7, 16, seed=1)
    only_itself = torch.zeros(7, 7, dtype=torch.bool)
    only_itself[3, 4] = True  # x gives the query (and the gated shortcut) of its own position only
    assert torch.equal(changed_positions(lambda t: ours(t, context), x, (3, 4)), only_itself)
    window = neighborhood_mask((7, 7), 3)[:, 3 * 7 + 4].reshape(7, 7)
    assert torch.equal(changed_positions(lambda t: ours(x, t), context, (3, 4)), window)


def test_gated_cross_neighborhood_gate_zero_is_identity_and_bad_context_is_named():
    ours = make("gated_cross_neighborhood", 16, num_heads=2, kernel_size=3)
    with torch.no_grad():
        ours.gate.zero_()  # the official initialisation
    x = rand(1, 5, 6, 16)
    torch.testing.assert_close(ours(x, rand(1, 5, 6, 16, seed=2)), x, **TOL)
    with pytest.raises(ValueError, match="context.shape"):
        ours(x, rand(1, 5, 5, 16))


# ---------------------------------------------------------------------------------------------------- msa_conv


def msa_conv_oracle(m, x, mask_padding=False):
    """Official MSA_Conv_2d with the im2col op written with F.unfold: logits over the k×k zero-padded window."""
    b, h, w, c = x.shape
    k, d = m.kernel_size, m.dilation
    q, key, v = m.qkv(x).permute(0, 3, 1, 2).chunk(3, dim=1)
    unfold = lambda t: F.unfold(t, k, dilation=d, padding=d * (k // 2)).reshape(b, c, k * k, h, w)
    dots = (q[:, :, None] * unfold(key)).sum(1) * c**-0.5  # [B, k², H, W]
    if mask_padding:
        inside = unfold(torch.ones(1, 1, h, w, dtype=x.dtype).expand(b, c, h, w))[:, :1] > 0
        dots = dots.masked_fill(~inside[:, 0], float("-inf"))
    attn = dots.softmax(1)
    out = (attn[:, None] * unfold(v)).sum(2) + x.permute(0, 3, 1, 2)
    return F.relu(m.mlp(out)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("kernel, dilation, mask", [(3, 1, False), (5, 2, False), (3, 2, True)])
def test_msa_conv_matches_official_unfold_definition(kernel, dilation, mask):
    ours = make("msa_conv", 8, kernel_size=kernel, dilation=dilation, mask_padding=mask)
    x = rand(2, 6, 7, 8)
    torch.testing.assert_close(ours(x), msa_conv_oracle(ours, x, mask), **TOL)


def test_msa_conv_padding_mode_only_changes_border_windows():
    ours = make("msa_conv", 8, kernel_size=3)
    masked = make("msa_conv", 8, kernel_size=3, mask_padding=True)
    masked.load_state_dict(ours.state_dict())
    x = rand(1, 8, 8, 8)
    diff = (ours(x) - masked(x)).abs().amax(-1)[0] > 1e-12
    # attention differs on the border ring; the 3x3 conv spreads it one more pixel inwards
    assert diff[0].all() and not diff[3:5, 3:5].any()


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
    ours = make("shifted_sparse_group", 16, num_heads=4, window_size=window, num_tokens=sinks)
    x = rand(2, *size, 16)
    torch.testing.assert_close(ours(x), s2_oracle(ours, x), **TOL)


def test_shifted_sparse_group_one_group_without_sinks_is_mhsa():
    """A group of twice the sequence holds every token in both halves of the heads (the shift is g/2 = N)."""
    ours = make("shifted_sparse_group", 16, num_heads=2, window_size=128, num_tokens=0)
    mhsa = attnzoo.create("mhsa", 16, num_heads=2).to(DT).eval()
    mhsa.load_state_dict(ours.state_dict())
    x = rand(1, 8, 8, 16)
    torch.testing.assert_close(ours(x), mhsa(x), **TOL)
