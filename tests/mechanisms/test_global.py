"""Global, head-mixing and cross-attention mechanisms: parity with timm / torch references and paper properties.

Parity protocol: float64, eval mode, every parameter and BN statistic randomised, timm
``fused_attn = False``, explicit key maps, tolerance 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnzoo

from conftest import randomize_

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def copy_params(target: nn.Module, mapping: dict[str, torch.Tensor]) -> None:
    """Load ``mapping`` (our key → tensor) into ``target``; every parameter and buffer of ``target`` must be named."""
    state = target.state_dict()
    assert set(mapping) == set(state), set(state) ^ set(mapping)
    target.load_state_dict({k: v.reshape(state[k].shape).clone() for k, v in mapping.items()})


def make(name: str, dim: int, **kwargs) -> nn.Module:
    return attnzoo.create(name, dim, **kwargs).to(DT).eval()


# --------------------------------------------------------------------------------------------------------- mhsa


def test_mhsa_matches_timm_attention():
    from timm.layers import Attention

    from attnzoo.interop.timm import vit_attention_weights

    ref = randomize_(Attention(24, num_heads=3, qkv_bias=True).to(DT)).eval()
    ref.fused_attn = False
    ours = make("mhsa", 24, num_heads=3)
    copy_params(ours, vit_attention_weights(ref))
    x = torch.randn(2, 11, 24, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_mhsa_matches_torch_multihead_attention_and_causal_mask():
    ref = randomize_(nn.MultiheadAttention(16, 4, batch_first=True).to(DT)).eval()
    ours = make("mhsa", 16, num_heads=4)
    copy_params(
        ours,
        {
            "qkv.weight": ref.in_proj_weight,
            "qkv.bias": ref.in_proj_bias,
            "proj.weight": ref.out_proj.weight,
            "proj.bias": ref.out_proj.bias,
        },
    )
    x = torch.randn(2, 9, 16, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], **TOL)
    causal = nn.Transformer.generate_square_subsequent_mask(9, dtype=DT)
    expected = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(ours(x, attn_mask=causal), expected, **TOL)
    ours.is_causal = True
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_mhsa_flattens_spatial_input_row_major_and_is_permutation_equivariant():
    m = randomize_(make("mhsa", 16, num_heads=2))
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


# --------------------------------------------------------------------------------------------- mixture_of_heads


def moh_reference(m, x):
    """Direct transcription of the official MoHAttention forward (one-hot top-k mask, explicit softmax)."""
    b, n, c = x.shape
    h, hs, k = m.num_heads, m.shared_heads, m.routed_topk
    q, kk, v = m.qkv(x).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = ((q @ kk.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
    heads = (attn @ v).transpose(1, 2)  # b n h d
    flat = x.reshape(b * n, c)
    gates = (flat @ m.routed_gate.weight.T).softmax(dim=1)
    mask = F.one_hot(gates.topk(k, dim=1).indices, num_classes=h - hs).sum(dim=1)
    routed = gates * mask
    routed = (routed / routed.sum(1, keepdim=True)).reshape(b, n, -1) * k
    shared = (flat @ m.shared_gate.weight.T).softmax(dim=1).reshape(b, n, -1) * hs
    w0 = (flat @ m.branch_gate.weight.T).softmax(dim=1).reshape(b, n, 2) * 2
    g = torch.cat([w0[..., :1] * shared, w0[..., 1:] * routed], dim=2)
    out = m.proj((g[..., None] * heads).reshape(b, n, -1))
    me, ce = gates.mean(0), mask.to(DT).mean(0)
    return out, torch.mean(me * ce) * (h - hs) ** 2


def test_mixture_of_heads_matches_official_forward_and_aux_loss():
    m = randomize_(make("mixture_of_heads", 24, num_heads=6, shared_heads=2, routed_topk=3), std=1.0)
    x = torch.randn(2, 10, 24, dtype=DT)
    expected, aux = moh_reference(m, x)
    torch.testing.assert_close(m(x), expected, **TOL)
    assert m.aux_loss() is None  # eval mode
    m.train()
    torch.testing.assert_close(m(x), expected, **TOL)
    torch.testing.assert_close(m.aux_loss(), 0.01 * aux, **TOL)
    m.eval()(x)
    assert m.aux_loss() is None  # an eval-mode forward clears the last one


def test_mixture_of_heads_with_zero_routers_and_all_heads_equals_mhsa():
    m = randomize_(make("mixture_of_heads", 24, num_heads=6, shared_heads=2, routed_topk=4))
    with torch.no_grad():
        for gate in (m.routed_gate, m.shared_gate, m.branch_gate):
            gate.weight.zero_()
    ref = make("mhsa", 24, num_heads=6)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("qkv", "proj")})
    x = torch.randn(2, 3, 4, 24, dtype=DT)
    torch.testing.assert_close(m(x), ref(x), **TOL)


def test_mixture_of_heads_zero_gates_per_token_and_row_local_routing():
    m = randomize_(make("mixture_of_heads", 32, num_heads=8, shared_heads=2, routed_topk=4), std=1.0)
    x = torch.randn(2, 7, 32, dtype=DT)
    gates, _ = m.gates(x)
    assert gates.shape == (2, 7, 8)
    assert ((gates[..., 2:] == 0).sum(-1) == 6 - 4).all()
    assert (gates[..., :2] > 0).all()
    changed = x.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])
    torch.testing.assert_close(m.gates(changed)[0][:, :3], gates[:, :3], **TOL)


def test_mixture_of_heads_all_shared_and_all_routed_configurations():
    x = torch.randn(1, 5, 16, dtype=DT)
    shared_only = randomize_(make("mixture_of_heads", 16, num_heads=4, shared_heads=4, routed_topk=0))
    g, _ = shared_only.gates(x)
    torch.testing.assert_close(g, 4 * (x @ shared_only.shared_gate.weight.T).softmax(-1), **TOL)
    routed_only = randomize_(make("mixture_of_heads", 16, num_heads=4, shared_heads=0, routed_topk=1))
    g, _ = routed_only.gates(x)
    assert ((g > 0).sum(-1) == 1).all() and torch.allclose(g.sum(-1), torch.ones(1, 5, dtype=DT))
    with pytest.raises(ValueError, match="routed_topk=5"):
        attnzoo.create("mixture_of_heads", 16, num_heads=4, shared_heads=1, routed_topk=5)
    with pytest.raises(ValueError, match="shared_heads=9"):
        attnzoo.create("mixture_of_heads", 16, num_heads=4, shared_heads=9)


# -------------------------------------------------------------------------------------------- cross / cls_cross


def test_cross_matches_torch_multihead_attention_with_kdim_vdim():
    ref = randomize_(nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True).to(DT)).eval()
    ours = make("cross", 16, num_heads=4, context_dim=12, qkv_bias=True)
    bias = ref.in_proj_bias
    copy_params(
        ours,
        {
            "q.weight": ref.q_proj_weight,
            "q.bias": bias[:16],
            "kv.weight": torch.cat([ref.k_proj_weight, ref.v_proj_weight]),
            "kv.bias": bias[16:],
            "proj.weight": ref.out_proj.weight,
            "proj.bias": ref.out_proj.bias,
        },
    )
    x, ctx = torch.randn(2, 7, 16, dtype=DT), torch.randn(2, 5, 12, dtype=DT)
    torch.testing.assert_close(ours(x, ctx), ref(x, ctx, ctx, need_weights=False)[0], **TOL)
    pad = torch.tensor([[False, False, True, False, True], [False] * 5])
    expected = ref(x, ctx, ctx, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(ours(x, ctx, key_padding_mask=pad), expected, **TOL)
    with pytest.raises(ValueError, match="context_dim=12"):
        ours(x)


def test_cross_with_context_x_equals_mhsa_and_properties():
    cross = randomize_(make("cross", 16, num_heads=2, qkv_bias=True))
    mhsa = make("mhsa", 16, num_heads=2)
    mhsa.load_state_dict(
        {
            "qkv.weight": torch.cat([cross.q.weight, cross.kv.weight]),
            "qkv.bias": torch.cat([cross.q.bias, cross.kv.bias]),
            "proj.weight": cross.proj.weight,
            "proj.bias": cross.proj.bias,
        }
    )
    x = torch.randn(2, 3, 4, 16, dtype=DT)
    torch.testing.assert_close(cross(x), mhsa(x), **TOL)
    torch.testing.assert_close(cross(x, x), mhsa(x), **TOL)
    ctx = torch.randn(2, 6, 16, dtype=DT)
    y = cross(x, ctx)
    torch.testing.assert_close(cross(x, ctx[:, torch.randperm(6)]), y, **TOL)  # context order is irrelevant
    x2 = x.clone()
    x2[:, 1] += 1.0  # output row i depends only on x_i (and the context)
    y2 = cross(x2, ctx)
    torch.testing.assert_close(y2[:, [0, 2]], y[:, [0, 2]], **TOL)
    assert not torch.allclose(y2[:, 1], y[:, 1])


def test_cls_cross_matches_timm_crossvit_attention():
    from timm.models.crossvit import CrossAttention

    from attnzoo.interop.timm import class_attention_weights

    ref = randomize_(CrossAttention(24, num_heads=3, qkv_bias=True).to(DT)).eval()
    ours = make("cls_cross", 24, num_heads=3)
    copy_params(ours, class_attention_weights(ref))  # wq, [wk; wv], proj
    x = torch.randn(2, 9, 24, dtype=DT)
    y = ours(x)
    assert y.shape == (2, 1, 24) and ours.output_shape(x.shape) == (2, 1, 24)
    torch.testing.assert_close(y, ref(x), **TOL)


def test_cls_cross_is_row_zero_of_mhsa_and_ignores_patch_order():
    cls = randomize_(make("cls_cross", 16, num_heads=4))
    mhsa = make("mhsa", 16, num_heads=4)
    mhsa.load_state_dict(
        {
            "qkv.weight": torch.cat([cls.q.weight, cls.kv.weight]),
            "qkv.bias": torch.cat([cls.q.bias, cls.kv.bias]),
            "proj.weight": cls.proj.weight,
            "proj.bias": cls.proj.bias,
        }
    )
    x = torch.randn(3, 10, 16, dtype=DT)
    torch.testing.assert_close(cls(x), mhsa(x)[:, :1], **TOL)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(9)])
    torch.testing.assert_close(cls(x[:, perm]), cls(x), **TOL)


# ------------------------------------------------------------------------------------------------ channel_group


def test_channel_group_matches_timm_davit_with_sliced_qkv():
    from timm.models.davit import ChannelAttention

    from attnzoo.interop.timm import davit_channel_weights

    ref = randomize_(ChannelAttention(24, num_heads=3, qkv_bias=True).to(DT)).eval()
    ours = make("channel_group", 24, num_heads=3)
    copy_params(ours, davit_channel_weights(ref))  # timm's q, k, v slices = our V̂, Q̂, K̂
    x = torch.randn(2, 4, 5, 24, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x.reshape(2, 20, 24)).reshape(x.shape), **TOL)


def test_channel_group_properties():
    m = randomize_(make("channel_group", 12, num_heads=3))
    seq = torch.randn(2, 10, 12, dtype=DT)
    perm = torch.randperm(10)
    torch.testing.assert_close(m(seq[:, perm]), m(seq)[:, perm], **TOL)  # token-permutation equivariant
    single = randomize_(make("channel_group", 12, num_heads=12))  # G = C: one channel per group ⇒ proj(V̂)
    v = seq @ single.qkv.weight[24:].T + single.qkv.bias[24:]
    torch.testing.assert_close(single(seq), single.proj(v), **TOL)
    # group g's output channels depend only on group g's Q̂, K̂, V̂ (pre-projection)
    m.proj.weight.data.copy_(torch.eye(12, dtype=DT))
    m.proj.bias.data.zero_()
    y = m(seq)
    with torch.no_grad():
        m.qkv.weight[[4, 16, 28]] += 1.0  # channel 0 of group 1 in Q̂, K̂ and V̂
    y2 = m(seq)
    torch.testing.assert_close(y2[..., :4], y[..., :4], **TOL)
    torch.testing.assert_close(y2[..., 8:], y[..., 8:], **TOL)
    assert not torch.allclose(y2[..., 4:8], y[..., 4:8])


# --------------------------------------------------------------------------------------------- gated_positional


def gpsa_pair(dim=16, heads=4, locality=0.7):
    from timm.models.convit import GPSA

    from attnzoo.interop.timm import gpsa_weights

    ref = randomize_(GPSA(dim, num_heads=heads, qkv_bias=True, locality_strength=locality).to(DT)).eval()
    ref.local_init()
    with torch.no_grad():
        ref.gating_param.copy_(torch.randn(heads, dtype=DT))
    ref.fused_attn = False
    ours = make("gated_positional", dim, num_heads=heads, qkv_bias=True, locality_strength=locality)
    copy_params(ours, gpsa_weights(ref))
    return ref, ours


def test_gated_positional_matches_timm_gpsa_after_local_init():
    ref, ours = gpsa_pair()
    x = torch.randn(2, 5, 5, 16, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x.reshape(2, 25, 16)).reshape(x.shape), **TOL)
    fresh = make("gated_positional", 16, num_heads=4, qkv_bias=True, locality_strength=0.7)  # our own local init
    for name in ("v.weight", "pos_proj.weight", "gating_param"):
        expected = ref.state_dict()[name] if name != "gating_param" else torch.ones(4, dtype=DT)
        torch.testing.assert_close(fresh.state_dict()[name], expected, rtol=1e-6, atol=1e-7)  # built in fp32


def test_gated_positional_gate_limits():
    _, m = gpsa_pair()
    x = torch.randn(2, 3, 5, 16, dtype=DT)  # non-square grids work
    mhsa = make("mhsa", 16, num_heads=4)
    mhsa.load_state_dict(
        {
            "qkv.weight": torch.cat([m.qk.weight, m.v.weight]),
            "qkv.bias": torch.cat([m.qk.bias, m.v.bias]),
            "proj.weight": m.proj.weight,
            "proj.bias": m.proj.bias,
        }
    )
    with torch.no_grad():
        m.gating_param.fill_(-1e4)  # λ → −∞ ⇒ MHSA
    torch.testing.assert_close(m(x), mhsa(x), **TOL)
    with torch.no_grad():
        m.gating_param.fill_(1e4)  # λ → +∞ ⇒ content-independent attention (positional only)
    y = m(x)
    with torch.no_grad():
        m.qk.weight.copy_(torch.randn_like(m.qk.weight))
        m.qk.bias.copy_(torch.randn_like(m.qk.bias))
    torch.testing.assert_close(m(x), y, **TOL)
    with torch.no_grad():
        m.gating_param.fill_(0.0)  # in between, q and k matter again
    z = m(x)
    with torch.no_grad():
        m.qk.weight.mul_(2.0)
    assert not torch.allclose(m(x), z)


def test_gated_positional_local_init_head_peaks_at_its_offset():
    m = make("gated_positional", 36, num_heads=9, locality_strength=2.0)
    from attnzoo.mechanisms.gated_positional import relative_offsets

    weights = m.pos_proj(relative_offsets(7, 7).to(DT)).softmax(dim=1)  # [Nq, Nk, h]
    centre_query = 3 * 7 + 3
    for head in range(9):
        h1, h2 = head % 3, head // 3
        key = weights[centre_query, :, head].argmax().item()
        assert (key // 7 - 3, key % 7 - 3) == (h1 - 1, h2 - 1)


# ------------------------------------------------------------------------------------------------- single_head


def test_single_head_matches_timm_shvit_shsa():
    from timm.models.shvit import SHSA

    from attnzoo.interop.timm import single_head_weights

    ref = randomize_(SHSA(20, qk_dim=6, pdim=8).to(DT))
    ref.eval()
    ours = make("single_head", 20, qk_dim=6, partial_dim=8)
    copy_params(ours, single_head_weights(ref))
    x = torch.randn(2, 5, 6, 20, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **TOL)


def test_single_head_properties():
    m = make("single_head", 20, qk_dim=6, partial_dim=8)
    x = torch.randn(2, 4, 5, 20, dtype=DT)
    assert m(x).abs().max() == 0  # output BN weight 0 at init
    randomize_(m)
    y = m(x)
    x2 = x.clone()
    x2[:, 1, 2, 8:] += torch.randn(2, 12, dtype=DT)  # x₂ of one token reaches only that token's output
    diff = (m(x2) - y).abs().amax(dim=(0, 3))
    assert diff[1, 2] > 1e-6 and (diff.flatten().topk(2).values[1] < 1e-12)
    assert attnzoo.create("single_head", 224).partial_dim == 48


# ---------------------------------------------------------------------------------------------- cascaded_group


def cga_pair(dim=24, heads=3, key_dim=4, window=4, kernels=(3, 5, 3)):
    from timm.models.efficientvit_msra import LocalWindowAttention

    from attnzoo.interop.timm import cascaded_group_weights

    ref = LocalWindowAttention(
        dim,
        key_dim,
        heads,
        attn_ratio=dim / (heads * key_dim),
        resolution=window,
        window_resolution=window,
        kernels=kernels,
    ).to(DT)
    randomize_(ref)
    ref.train(False)  # never chain .eval() on this family (returns None in some timm versions)
    ours = make(
        "cascaded_group",
        dim,
        num_heads=heads,
        qk_dim=key_dim,
        window_size=window,
        kernel_size=kernels,
        mask_padding=False,
    )
    copy_params(ours, cascaded_group_weights(ref))
    return ref, ours


def test_cascaded_group_matches_timm_local_window_attention_with_padding():
    ref, ours = cga_pair()
    for size in ((4, 4), (6, 9), (8, 4)):
        x = torch.randn(2, *size, 24, dtype=DT)
        torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **TOL)


def test_cascaded_group_cached_bias_follows_parameter_edits():
    ref, ours = cga_pair()
    x = torch.randn(2, 4, 4, 24, dtype=DT)
    with torch.no_grad():
        ours(x)  # fills the cache
        for module in (ref, ours):
            (module.attn if hasattr(module, "attn") else module).attention_biases.mul_(-2.0)
        ref.train(False)  # timm re-gathers its cache on train(False)
        torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **TOL)


def test_cascaded_group_triangular_dependency_and_masked_padding():
    _, m = cga_pair()
    x = torch.randn(1, 4, 4, 24, dtype=DT)
    heads = []

    def grab(module, args, output):
        heads.append(args[0].detach().clone())  # ReLU([o₁..o_h]) is proj's input

    hook = m.proj.register_forward_hook(grab)
    m(x)
    x2 = x.clone()
    x2[..., 8:16] += 1.0  # chunk 2 (head 2's input) changes
    m(x2)
    hook.remove()
    a, b = heads
    torch.testing.assert_close(a[:, :8], b[:, :8], **TOL)  # head 1 depends on x₁ only
    assert not torch.allclose(a[:, 8:16], b[:, 8:16]) and not torch.allclose(a[:, 16:], b[:, 16:])


def test_cascaded_group_masked_padding_equals_unpadded_window():
    """mask_padding=True on a 3×2 grid in a 4×4 window = attention over the 6 real tokens only (pointwise DW convs,
    so the padded q values cannot leak in through the convolution); computed here from timm's own submodules."""
    ref, m = cga_pair(kernels=(1, 1, 1))
    m.mask_padding = True
    x = torch.randn(2, 3, 2, 24, dtype=DT)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(2), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :]).abs() * 4 + (xs[:, None] - xs[None, :]).abs()
    att = ref.attn
    feats, feat = [], None
    for j, chunk in enumerate(x.permute(0, 3, 1, 2).chunk(3, dim=1)):
        feat = chunk if feat is None else feat + chunk
        q, k, v = att.qkvs[j](feat).split([4, 4, 8], dim=1)
        q, k, v = att.dws[j](q).flatten(2), k.flatten(2), v.flatten(2)
        a = (q.transpose(1, 2) @ k * 0.5 + att.attention_biases[j][index]).softmax(-1)
        feat = (v @ a.transpose(1, 2)).reshape(2, 8, 3, 2)
        feats.append(feat)
    expected = att.proj(torch.cat(feats, dim=1)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), expected, **TOL)
    m.mask_padding = False
    assert not torch.allclose(m(x), expected)


def test_cascaded_group_bias_table_is_flip_symmetric():
    _, m = cga_pair()
    bias = m.attention_biases[:, m.bias_index].reshape(3, 4, 4, 4, 4)  # [h, yq, xq, yk, xk]
    torch.testing.assert_close(bias, bias.flip(1, 3), **TOL)
    torch.testing.assert_close(bias, bias.flip(2, 4), **TOL)


# --------------------------------------------------------------------------------------------------- manhattan


def masa_reference(m, x):
    """Dense MaSA written independently: complex-number RoPE, explicit distances, explicit softmaxes."""
    b, hh, ww, c = x.shape
    h, d = m.num_heads, m.head_dim
    n = hh * ww
    theta = 10000.0 ** (-torch.arange(d // 2, dtype=DT) / (d // 2 - 1))
    rot = torch.polar(torch.ones(n, d // 2, dtype=DT), torch.arange(n, dtype=DT)[:, None] * theta)  # e^{i n θ}

    def rope(t):  # [b, n, h, d], pairs (2m, 2m+1) as one complex number
        z = torch.view_as_complex(t.reshape(b, n, h, d // 2, 2).contiguous()) * rot[None, :, None]
        return torch.view_as_real(z).reshape(b, n, h, d)

    q = rope(m.q_proj(x).reshape(b, n, h, d))
    k = rope(m.k_proj(x).reshape(b, n, h, d)) * d**-0.5
    v = m.v_proj(x).reshape(b, n, h, d)
    log_gamma = torch.log(1 - 2.0 ** (-m.init_value - m.heads_range * torch.arange(h, dtype=DT) / h))
    yy, xx = torch.div(torch.arange(n), ww, rounding_mode="floor"), torch.arange(n) % ww
    dy, dx = (yy[:, None] - yy[None]).abs().to(DT), (xx[:, None] - xx[None]).abs().to(DT)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    if not m.decomposed:
        a = (scores + log_gamma[:, None, None] * (dy + dx)).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", a, v)
    else:  # rows (same y, bias |Δx|), then columns (same x, bias |Δy|); other pairs masked out
        same_row, same_col = dy == 0, dx == 0
        a_row = (scores + log_gamma[:, None, None] * dx).masked_fill(~same_row, float("-inf")).softmax(-1)
        a_col = (scores + log_gamma[:, None, None] * dy).masked_fill(~same_col, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", a_col, torch.einsum("bhqk,bkhd->bqhd", a_row, v))
    lce = m.lepe(v.reshape(b, hh, ww, h * d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return m.out_proj(out.reshape(b, hh, ww, h * d) + lce)


@pytest.mark.parametrize("decomposed", [False, True])
def test_manhattan_matches_dense_reference(decomposed):
    m = randomize_(make("manhattan", 16, num_heads=2, decomposed=decomposed, heads_range=3.0))
    x = torch.randn(2, 3, 5, 16, dtype=DT)
    torch.testing.assert_close(m(x), masa_reference(m, x), **TOL)


def test_manhattan_zero_queries_give_gamma_power_of_distance():
    x = torch.randn(1, 4, 5, 8, dtype=DT)
    results = []
    for decomposed in (False, True):
        m = make("manhattan", 8, num_heads=2, decomposed=decomposed)
        with torch.no_grad():
            for lin in (m.q_proj, m.k_proj):
                lin.weight.zero_(), lin.bias.zero_()
            for lin in (m.v_proj, m.out_proj):
                lin.weight.copy_(torch.eye(8, dtype=DT)), lin.bias.zero_()
            m.lepe.weight.zero_(), m.lepe.bias.zero_()
        results.append(m(x))
    gamma = 1 - 2.0 ** (-2.0 - 4.0 * torch.arange(2, dtype=DT) / 2)  # closed form γ_h^{|Δy|+|Δx|}, normalised
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    dist = (ys.flatten()[:, None] - ys.flatten()[None]).abs() + (xs.flatten()[:, None] - xs.flatten()[None]).abs()
    weights = gamma[:, None, None] ** dist.to(DT)
    weights = weights / weights.sum(-1, keepdim=True)  # [h, N, N]
    expected = torch.einsum("hqk,khd->qhd", weights, x.reshape(20, 2, 4)).reshape(1, 4, 5, 8)
    for y in results:  # full and decomposed coincide when q = k = 0 (the decay factorises over the axes)
        torch.testing.assert_close(y, expected, **TOL)


def test_manhattan_no_decay_full_is_rope_mhsa_and_decomposed_reaches_every_token():
    m = randomize_(make("manhattan", 8, num_heads=2, decomposed=False, init_value=1e4))  # ln γ = 0
    assert m.log_gamma.abs().max() == 0
    x = torch.randn(1, 3, 4, 8, dtype=DT, requires_grad=True)
    torch.testing.assert_close(m(x), masa_reference(m, x), **TOL)
    d = randomize_(make("manhattan", 8, num_heads=2, decomposed=True))
    with torch.no_grad():
        d.lepe.weight.zero_()
    d(x)[0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # the top-left output depends on every token


# ------------------------------------------------------------------------------------------- gaussian_adaptive


@pytest.mark.parametrize("norm_axis,axis", [("channels", -1), ("tokens", 1)])
def test_gaussian_adaptive_product_matches_pip_wheel(norm_axis, axis):
    wheel = pytest.importorskip("gaussian_adaptive_attention")  # pip gaussian-adaptive-attention==0.1.5
    ref = wheel.MultiHeadGaussianAdaptiveAttention(axis, num_heads=3, num_gaussians=2).to(DT)
    randomize_(ref)
    ours = make("gaussian_adaptive", 14, num_heads=3, num_gaussians=2, norm_axis=norm_axis, mixture="product")
    copy_params(
        ours,
        {
            "mean_offsets": torch.stack([h.mean_offsets for h in ref.attention_heads]),
            "scales": torch.stack([h.c for h in ref.attention_heads]),
        },
    )
    x = torch.randn(2, 11, 14, dtype=DT)  # 14 channels / 11 tokens over 3 heads: the last chunk is larger
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_gaussian_adaptive_sum_variant_matches_direct_formula():
    m = randomize_(make("gaussian_adaptive", 12, num_heads=3, num_gaussians=4, norm_axis="channels"))
    x = torch.randn(2, 5, 12, dtype=DT)
    chunks = x.reshape(2, 5, 3, 4)
    mu, sd = chunks.mean(-1, keepdim=True), (chunks.var(-1, keepdim=True) + 1e-8).sqrt()
    mix = torch.zeros_like(chunks)
    for h in range(3):
        w = torch.softmax(m.mixture_logits[h], 0)
        for g in range(4):
            z = (chunks[:, :, h] - mu[:, :, h] - m.mean_offsets[h, g]) / sd[:, :, h]
            mix[:, :, h] += w[g] * torch.exp(-(z**2) / (2 * m.scales[h, g] ** 2))
    expected = x * (mix / mix.sum(-1, keepdim=True)).reshape(2, 5, 12)
    torch.testing.assert_close(m(x), expected, **TOL)


@pytest.mark.parametrize("norm_axis,axis", [("channels", -1), ("tokens", 1)])
def test_gaussian_adaptive_product_variant_matches_direct_formula(norm_axis, axis):
    """The pip-wheel parity test above is skipped without the wheel; this checks the same variant by hand."""
    m = randomize_(make("gaussian_adaptive", 14, num_heads=3, num_gaussians=2, norm_axis=norm_axis, mixture="product"))
    with torch.no_grad():
        m.scales.copy_(1.0 + torch.rand_like(m.scales))  # c ≥ 1: few products underflow to 0
    x = torch.randn(2, 11, 14, dtype=DT)  # 14 channels / 11 tokens over 3 heads: chunks 4, 4, 6 / 3, 3, 5
    bounds = {"channels": [0, 4, 8, 14], "tokens": [0, 3, 6, 11]}[norm_axis]
    expected = torch.empty_like(x)
    for h in range(3):
        chunk = x.narrow(axis, bounds[h], bounds[h + 1] - bounds[h])
        mu, sd = chunk.mean(axis, keepdim=True), (chunk.var(axis, keepdim=True) + 1e-8).sqrt()
        mix = torch.ones_like(chunk)
        for g in range(2):
            c = m.scales[h, g]
            z = (chunk - mu - m.mean_offsets[h, g]) / sd
            mix = mix * torch.exp(-(z**2) / (2 * c**2)) / torch.sqrt(2 * torch.pi * c**2)
        weights = mix / mix.sum(axis, keepdim=True).clamp_min(1e-8)  # M̂ = M / max(Σ_chunk M, eps)
        expected.narrow(axis, bounds[h], bounds[h + 1] - bounds[h]).copy_(chunk * weights)
    assert (expected != 0).double().mean() > 0.5  # most chunks do not underflow: the comparison is not vacuous
    torch.testing.assert_close(m(x), expected, **TOL)


@pytest.mark.parametrize("norm_axis", ["channels", "tokens"])
def test_gaussian_adaptive_chunk_normalisation_affine_invariance_and_permutation(norm_axis):
    m = randomize_(make("gaussian_adaptive", 12, num_heads=3, num_gaussians=2, norm_axis=norm_axis, eps=1e-15))
    with torch.no_grad():
        m.mean_offsets.zero_()
    x = torch.randn(2, 9, 12, dtype=DT)
    w = m.weights(x)
    axis = -1 if norm_axis == "channels" else 1
    sizes = m.chunk_sizes(x.shape[axis])
    for chunk in w.split(sizes, dim=axis):
        torch.testing.assert_close(chunk.sum(axis), torch.ones_like(chunk.sum(axis)), **TOL)
    # δ = 0: M̂ invariant (up to eps, tiny here) to a positive affine map of each chunk
    scale, shift = torch.rand(1, 1, 1, dtype=DT) + 0.5, torch.randn(1, 1, 1, dtype=DT)
    torch.testing.assert_close(m.weights(scale * x + shift), w, rtol=1e-6, atol=1e-7)
    # permuting elements inside a chunk permutes the output identically
    perm = torch.arange(x.shape[axis])
    perm[: sizes[0]] = torch.randperm(sizes[0])
    y = m(x)
    torch.testing.assert_close(m(x.index_select(axis, perm)), y.index_select(axis, perm), **TOL)
    with pytest.raises(ValueError, match="length 3"):
        make("gaussian_adaptive", 12, num_heads=3, norm_axis="tokens")(torch.randn(1, 3, 12, dtype=DT))
