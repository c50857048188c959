"""Summary-token mechanisms: a few pooled / compressed / proxy tokens mix with (or stand in for) all tokens.

``lookup_tokens`` against vit-pytorch's ``look_vit`` (weights copied, float64, 1e-10); the others against the
definition written out with explicit loops, plus properties that a wrong implementation would break.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from conftest import hand_attention

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def make(name, dim=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = attnzoo.create(name, dim, **kwargs).to(DT).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return m


def heads_of(t, heads):
    return t.reshape(*t.shape[:-1], heads, -1)


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
            parts = [F.layer_norm(full[g * d : (g + 1) * d], (d,), m.head_norm.weight, m.head_norm.bias) for g in range(h)]
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
    reuse = look_vit.Attention(dim, heads=heads, dim_head=dim_head, dropout=0.0, cross_attend=True, reuse_attention=True)
    refs = [r.to(DT).eval() for r in (lookup, attn, mlp, reuse)]
    with torch.no_grad():
        for r in refs:
            for p in r.parameters():
                p.copy_(0.5 * torch.randn_like(p))
    ours = attnzoo.create("lookup_tokens", dim, num_heads=heads, num_tokens=9).to(DT).eval()
    one = lambda ln: ln.gamma + 1  # noqa: E731  (vit-pytorch's bias-free LayerNorm with unit offset)
    ours.load_state_dict({
        "lookup_norm.weight": one(lookup.norm), "lookup_context_norm.weight": one(lookup.norm_context),
        "lookup_q.weight": lookup.to_q.weight, "lookup_k.weight": lookup.to_k.weight,
        "lookup_v.weight": lookup.to_v.weight, "lookup_out.weight": lookup.to_out[1].weight,
        "self_norm.weight": one(attn.norm),
        "self_qkv.weight": torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]),
        "self_out.weight": attn.to_out[1].weight,
        "mlp.0.weight": one(mlp[0]), "mlp.1.weight": mlp[1].weight, "mlp.1.bias": mlp[1].bias,
        "mlp.4.weight": mlp[4].weight, "mlp.4.bias": mlp[4].bias,
        "reuse_context_norm.weight": one(reuse.norm_context), "reuse_v.weight": reuse.to_v.weight,
        "reuse_out.weight": reuse.to_out[1].weight,
    })  # fmt: skip
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
