"""Summary-token mechanisms: a few pooled / compressed / proxy tokens mix with (or stand in for) all tokens.

``lookup_tokens`` against vit-pytorch's ``look_vit`` (weights copied, float64, 1e-10); the others against the
definition written out with explicit loops, plus properties that a wrong implementation would break.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo

from conftest import hand_attention, heads_of, randomize_

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def make(name, dim=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = attnzoo.create(name, dim, **kwargs).to(DT).eval()
    return randomize_(m)


# ----------------------------------------------------------------------------------------------------- head_token


def head_token_oracle(m, tokens):
    b, n, c = tokens.shape
    h, d = m.num_heads, c // m.num_heads
    rows = []
    for i in range(b):
        summary = []
        for head in range(h):
            pooled = tokens[i, :, head * d : (head + 1) * d].mean(0)  # this head's channel group, mean over tokens
            full = m.head_proj.weight @ pooled + m.head_proj.bias  # [C]
            groups = [full[g * d : (g + 1) * d] for g in range(h)]
            parts = [F.layer_norm(part, (d,), m.head_norm.weight, m.head_norm.bias) for part in groups]
            summary.append(F.gelu(torch.cat(parts)) + m.head_pos[head])
        rows.append(torch.cat([tokens[i], torch.stack(summary)]))
    z = torch.stack(rows)
    q, k, v = (heads_of(t, h) for t in (z @ m.qkv.weight.T).chunk(3, dim=-1))
    out, _ = hand_attention(q, k, v, d**-0.5)
    return out.reshape(b, n + h, c) @ m.proj.weight.T + m.proj.bias


def test_head_token_matches_the_written_out_definition_and_drops_or_merges_head_tokens():
    m = make("head_token", num_heads=4)
    x = torch.randn(2, 10, 16, dtype=DT)
    full = head_token_oracle(m, x)
    torch.testing.assert_close(m(x), full[:, :10], **TOL)
    m.cls_token = True  # official DHVT: the head tokens' mean output is added to the CLS token
    expected = full[:, :10].clone()
    expected[:, 0] += full[:, 10:].mean(1)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_head_token_is_permutation_equivariant_and_differs_from_mhsa():
    m = make("head_token", num_heads=2)
    x = torch.randn(2, 3, 4, 16, dtype=DT)
    perm = torch.randperm(12)
    y = m(x).reshape(2, 12, 16)
    torch.testing.assert_close(m(x.reshape(2, 12, 16)[:, perm]), y[:, perm], **TOL)
    ref = attnzoo.create("mhsa", 16, num_heads=2, qkv_bias=False).to(DT)
    ref.load_state_dict({"qkv.weight": m.qkv.weight, "proj.weight": m.proj.weight, "proj.bias": m.proj.bias})
    assert not torch.allclose(ref(x), m(x))


# -------------------------------------------------------------------------------------------------- lookup_tokens


def test_lookup_tokens_matches_vit_pytorch_look_vit_layer():
    look_vit = pytest.importorskip("vit_pytorch.look_vit")
    dim, heads, dim_head = 16, 2, 8
    torch.manual_seed(0)
    lookup = look_vit.Attention(dim, heads=heads, dim_head=dim_head, dropout=0.0, cross_attend=True)
    attn = look_vit.Attention(dim, heads=heads, dim_head=dim_head, dropout=0.0)
    mlp = look_vit.MLP(dim, factor=4, dropout=0.0)
    reuse = look_vit.Attention(
        dim, heads=heads, dim_head=dim_head, dropout=0.0, cross_attend=True, reuse_attention=True
    )
    refs = [r.to(DT).eval() for r in (lookup, attn, mlp, reuse)]
    for r in refs:
        randomize_(r)
    ours = attnzoo.create("lookup_tokens", dim, num_heads=heads, num_tokens=9).to(DT).eval()
    one = lambda ln: ln.gamma + 1  # noqa: E731  (vit-pytorch's bias-free LayerNorm with unit offset)
    ours.load_state_dict(
        {
            "lookup_norm.weight": one(lookup.norm),
            "lookup_context_norm.weight": one(lookup.norm_context),
            "lookup_q.weight": lookup.to_q.weight,
            "lookup_k.weight": lookup.to_k.weight,
            "lookup_v.weight": lookup.to_v.weight,
            "lookup_out.weight": lookup.to_out[1].weight,
            "self_norm.weight": one(attn.norm),
            "self_qkv.weight": torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]),
            "self_out.weight": attn.to_out[1].weight,
            "mlp.0.weight": one(mlp[0]),
            "mlp.1.weight": mlp[1].weight,
            "mlp.1.bias": mlp[1].bias,
            "mlp.4.weight": mlp[4].weight,
            "mlp.4.bias": mlp[4].bias,
            "reuse_context_norm.weight": one(reuse.norm_context),
            "reuse_v.weight": reuse.to_v.weight,
            "reuse_out.weight": reuse.to_out[1].weight,
        }
    )
    x = torch.randn(2, 7, 8, dim, dtype=DT)
    with torch.no_grad():
        tokens = F.interpolate(x.permute(0, 3, 1, 2), 3, mode="bilinear").flatten(2).transpose(1, 2)
        highres = x.reshape(2, 56, dim)
        read, sim = lookup(tokens, highres, return_qk_sim=True)
        tokens = read + tokens
        tokens = attn(tokens) + tokens
        tokens = mlp(tokens) + tokens
        expected = reuse(highres, tokens, qk_sim=sim.transpose(-1, -2))
        torch.testing.assert_close(ours(x), expected.reshape(x.shape), **TOL)


def test_lookup_tokens_cost_is_linear_in_the_tokens():
    from attnzoo.mechanisms import mechanism_info

    assert mechanism_info("lookup_tokens").complexity == "linear"
    with pytest.raises(ValueError, match="num_tokens=8"):
        attnzoo.create("lookup_tokens", 16, num_tokens=8)


# ---------------------------------------------------------------------------------------- recursive_generalization


def test_recursive_generalization_reduces_until_four_tokens_per_side_remain():
    from attnzoo.mechanisms.recursive_generalization import num_recursions

    sizes = [(8, 8), (16, 16), (15, 64), (63, 63), (64, 64), (256, 300)]
    assert [num_recursions(*s) for s in sizes] == [0, 1, 0, 1, 2, 3]


def test_recursive_generalization_matches_the_written_out_definition():
    m = make("recursive_generalization", num_heads=2)  # head_dim 8, qk_dim 4
    x = torch.randn(2, 16, 20, 16, dtype=DT)
    y = x.permute(0, 3, 1, 2)
    y = F.conv2d(y, m.reduce.weight, m.reduce.bias, stride=4, groups=16)  # one recursion: 4×5 summary
    y = F.conv2d(y, m.dwconv.weight, m.dwconv.bias, padding=1, groups=16)
    y = F.conv2d(y, m.conv.weight, m.conv.bias).permute(0, 2, 3, 1)
    summary = F.gelu(F.layer_norm(y, (8,), m.norm.weight, m.norm.bias))
    v = summary @ m.v.weight.T + m.v.bias
    v = v + F.conv2d(v.permute(0, 3, 1, 2), m.cpe.weight, m.cpe.bias, padding=1, groups=16).permute(0, 2, 3, 1)
    q = heads_of((x @ m.q.weight.T + m.q.bias).reshape(2, 320, 8), 2)
    k = heads_of((summary @ m.k.weight.T + m.k.bias).reshape(2, 20, 8), 2)
    out, _ = hand_attention(q, k, heads_of(v.reshape(2, 20, 16), 2), 4**-0.5)
    expected = out.reshape(2, 16, 20, 16) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(m(x), expected, **TOL)


def test_recursive_generalization_is_global():
    m = make("recursive_generalization", num_heads=2)
    x = torch.randn(1, 16, 16, 16, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0, 0, 0].sum(), x)
    assert (g.abs().sum(-1) > 0).all()


# --------------------------------------------------------------------------------------------------- proxy_tokens


def proxy_oracle(m, x, ws, sampling):
    b, rows, cols, c = x.shape
    rp, cp = -(-rows // ws) * ws, -(-cols // ws) * ws
    padded = torch.zeros(b, rp, cp, c, dtype=DT)
    padded[:, :rows, :cols] = x
    if sampling == "random":  # eval: the window's centre token
        proxies = [padded[:, wy + ws // 2, wx + ws // 2] for wy in range(0, rp, ws) for wx in range(0, cp, ws)]
    else:  # the mean of the window's tokens inside the grid
        windows = [(wy, wx) for wy in range(0, rp, ws) for wx in range(0, cp, ws)]
        proxies = [x[:, wy : wy + ws, wx : wx + ws].mean(dim=(1, 2)) for wy, wx in windows]
    proxies = torch.stack(proxies, 1)
    pq, pk, pv = (heads_of(t, 2) for t in (proxies @ m.proxy_qkv.weight.T + m.proxy_qkv.bias).chunk(3, dim=-1))
    mixed, _ = hand_attention(pq, pk, pv, 8**-0.5)
    proxies = proxies + mixed.reshape(b, -1, c) @ m.proxy_proj.weight.T + m.proxy_proj.bias
    q = heads_of(x.reshape(b, -1, c) @ m.q.weight.T + m.q.bias, 2)
    k, v = (heads_of(t, 2) for t in (proxies @ m.kv.weight.T + m.kv.bias).chunk(2, dim=-1))
    out, _ = hand_attention(q, k, v, 8**-0.5)
    return (out.reshape(b, -1, c) @ m.proj.weight.T + m.proj.bias).reshape(x.shape)


@pytest.mark.parametrize("sampling", ["mean", "random"])
@pytest.mark.parametrize("size, ws", [((6, 6), 2), ((7, 5), 3)])
def test_proxy_tokens_eval_matches_the_written_out_definition(size, ws, sampling):
    m = make("proxy_tokens", num_heads=2, window_size=ws, sampling=sampling)
    x = torch.randn(2, *size, 16, dtype=DT)
    torch.testing.assert_close(m(x), proxy_oracle(m, x, ws, sampling), **TOL)


def test_proxy_sampling_agrees_on_constant_windows_and_is_seeded():
    cells = torch.randn(2, 3, 4, 16, dtype=DT)
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # each 2×2 window holds one token
    m = make("proxy_tokens", num_heads=2, window_size=2, sampling="random")
    reference = m(x)
    m.train()
    torch.testing.assert_close(m(x), reference, **TOL)  # a random token of a constant window is that token
    m.sampling = "mean"
    torch.testing.assert_close(m(x), reference, **TOL)
    m.sampling = "random"
    z = torch.randn(2, 6, 8, 16, dtype=DT)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(m(z))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------------------- glmix


def test_glmix_matches_the_official_mixer_written_with_torch_multihead_attention():
    m = make("glmix", num_heads=2, num_tokens=4, kernel_size=3)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(DT).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.qkv.weight)
        mha.in_proj_bias.copy_(m.qkv.bias)
        mha.out_proj.weight.copy_(m.proj.weight)
        mha.out_proj.bias.copy_(m.proj.bias)
    x = torch.randn(2, 5, 7, 16, dtype=DT)
    grid = x.permute(0, 3, 1, 2)
    flat = x.reshape(2, 35, 16)
    init = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    logits = F.normalize(init, dim=-1) @ (m.slot_scale * F.normalize(flat, dim=-1)).transpose(1, 2)
    slots = torch.softmax(logits, -1) @ flat
    slots = mha(slots, slots, slots, need_weights=False)[0]
    out = (torch.softmax(logits.transpose(1, 2), -1) @ slots).reshape(x.shape)
    local = F.conv2d(grid, m.local[0].weight, m.local[0].bias)
    local = F.conv2d(local, m.local[1].weight, m.local[1].bias, padding=1, groups=16)
    local = F.conv2d(local, m.local[2].weight, m.local[2].bias).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), out + local, **TOL)


def test_glmix_soft_clustering_passes_gradients():
    m = make("glmix", num_heads=2, num_tokens=4)
    x = torch.randn(2, 6, 6, 16, dtype=DT, requires_grad=True)
    y = m(x) - m.local(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # the global branch only
    g_scale, g_x = torch.autograd.grad((y * torch.randn_like(y)).sum(), [m.slot_scale, x])
    assert g_scale.abs() > 0 and (g_x.abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------- gather_scatter


def gather_scatter_oracle(m, x, threshold):
    """The official formulation: per image, masked_select the fg / bg queries, attend, scatter back."""
    b, n, c = x.shape
    out = torch.zeros_like(x)
    for i in range(b):
        t = x[i]
        heat = torch.sigmoid(t @ m.saliency.weight.T + m.saliency.bias)[:, 0]
        for side, weight, chosen in (("fg", heat, heat >= threshold), ("bg", 1 - heat, heat < 1 - threshold)):
            if not chosen.any():
                continue
            weighted = t * weight[:, None]
            soft = weighted @ m.gather[side].weight.T + m.gather[side].bias  # [N, K]
            semantic = soft.T @ weighted / n
            q = heads_of((t[chosen] @ m.q[side].weight.T + m.q[side].bias)[None], 2)
            k, v = (heads_of(u[None], 2) for u in (semantic @ m.kv[side].weight.T + m.kv[side].bias).chunk(2, -1))
            o, _ = hand_attention(q, k, v, 8**-0.5)
            out[i, chosen] = o.reshape(-1, c) @ m.proj[side].weight.T + m.proj[side].bias
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.6])
def test_gather_scatter_matches_the_gathered_formulation(threshold):
    m = make("gather_scatter", num_heads=2, num_tokens=3, threshold=threshold)
    x = torch.randn(3, 10, 16, dtype=DT)
    heat = torch.sigmoid(x @ m.saliency.weight.T + m.saliency.bias)
    assert (heat >= 0.5).any() and (heat < 0.5).any()  # both sets are populated
    torch.testing.assert_close(m(x), gather_scatter_oracle(m, x, threshold), **TOL)


def test_gather_scatter_saliency_learns_through_the_soft_weights():
    m = make("gather_scatter", num_heads=2, num_tokens=3)
    x = torch.randn(2, 10, 16, dtype=DT)
    (g,) = torch.autograd.grad(m(x).square().sum(), [m.saliency.weight])
    assert g.abs().sum() > 0
