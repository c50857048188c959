"""``self_guided`` (SG-Former): the significance map, the significance-sorted merging, and guidance between blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import BlockState
from attnzoo.models.backbone import Backbone

from conftest import hand_attention, heads_of, randomize_

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    m = attnzoo.create("self_guided", 16, num_heads=4, sr_ratio=2, merge_sizes=(4, 2, 1), **kwargs).to(DT).eval()
    return randomize_(m)


def oracle(m, x, guide=None):
    """Written out with loops: significance = attention received per reduced token, nearest-upsampled; tokens
    sorted by the guide; quarter / half / quarter merged by the three linear maps over runs of 4, 2, 1 tokens."""
    b, rows, cols, c = x.shape
    n = rows * cols
    tokens = x.reshape(b, n, c)
    reduced = F.conv2d(x.permute(0, 3, 1, 2), m.sr.weight, m.sr.bias, stride=2)
    r2, c2 = reduced.shape[-2:]
    reduced = F.gelu(F.layer_norm(reduced.flatten(2).transpose(1, 2), (c,), m.norm.weight, m.norm.bias))
    q = heads_of(tokens @ m.q_global.weight.T, 2)
    k, v = (heads_of(t, 2) for t in (reduced @ m.kv_global.weight.T).chunk(2, -1))
    global_out, _ = hand_attention(q, k, v, 4**-0.5)
    significance = torch.zeros(b, n, dtype=DT)
    for i in range(b):
        w = torch.stack([torch.softmax(q[i, :, h] @ k[i, :, h].T / 2, -1) for h in range(2)])  # [h, N, M]
        received = w.mean(0).mean(0)  # [M]
        for y in range(rows):
            for xx in range(cols):
                significance[i, y * cols + xx] = received[(y * r2 // rows) * c2 + (xx * c2 // cols)]
    guide = significance if guide is None else guide
    rows_out = []
    for i in range(b):
        ranked = tokens[i, sorted(range(n), key=lambda p: (guide[i, p].item(), p))]
        keys = []
        for merge, size, (lo, hi) in zip(m.merges, (4, 2, 1), ((0, n // 4), (n // 4, 3 * (n // 4)), (3 * (n // 4), n))):
            for start in range(lo, hi, size):
                run = ranked[start : min(start + size, hi)]
                weights = merge.weight[0, : run.shape[0]]
                keys.append(weights @ run + merge.bias[0])
        rows_out.append(torch.stack(keys))
    keys = torch.stack(rows_out)
    q2 = heads_of(tokens @ m.q_guided.weight.T, 2)
    k2, v2 = (heads_of(t, 2) for t in (keys @ m.kv_guided.weight.T).chunk(2, -1))
    guided_out, _ = hand_attention(q2, k2, v2, 4**-0.5)
    lepe = (
        F.conv2d(
            (x @ m.lepe_linear.weight.T + m.lepe_linear.bias).permute(0, 3, 1, 2),
            m.lepe_conv.weight,
            m.lepe_conv.bias,
            padding=1,
            groups=c,
        )
        .permute(0, 2, 3, 1)
        .reshape(b, n, c)
    )
    out = torch.cat([global_out.reshape(b, n, c // 2), guided_out.reshape(b, n, c // 2)], -1) + lepe
    return (out @ m.proj.weight.T + m.proj.bias).reshape(x.shape), significance


def test_self_guided_matches_the_written_out_definition():
    m = make()
    x = torch.randn(2, 6, 10, 16, dtype=DT)  # 60 tokens: groups 15 / 30 / 15 → 4 + 15 + 15 merged keys
    expected, _ = oracle(m, x)
    torch.testing.assert_close(m(x), expected, **TOL)
    assert m.merged_tokens(x.reshape(2, 60, 16), torch.rand(2, 60, dtype=DT)).shape[1] == math.ceil(15 / 4) + 15 + 15


def test_self_guided_uses_the_previous_blocks_significance():
    first, second = make(seed=1), make(seed=2)
    x0, x1 = torch.randn(2, 6, 8, 16, dtype=DT), torch.randn(2, 6, 8, 16, dtype=DT)
    state = BlockState()
    first(x0, state)
    (guide,) = state.read("self_guided")
    _, own_significance = oracle(first, x0)
    torch.testing.assert_close(guide, own_significance, **TOL)
    guided = second(x1, state)
    expected, _ = oracle(second, x1, guide=guide)
    torch.testing.assert_close(guided, expected, **TOL)
    assert not torch.allclose(guided, second(x1))  # standalone uses its own significance instead
    assert len(state.read("self_guided")) == 2


def test_self_guided_passes_no_gradient_through_the_significance_but_trains_the_merges():
    m = make().train()
    x = torch.randn(2, 6, 6, 16, dtype=DT, requires_grad=True)
    y = m(x)
    assert not m.coarse_global(x)[1].requires_grad
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, *(mm.weight for mm in m.merges)])
    assert (grads[0].abs().sum(-1) > 0).all() and all(g.abs().sum() > 0 for g in grads[1:])


def test_self_guided_runs_in_a_backbone_and_is_deterministic():
    torch.manual_seed(0)
    model = Backbone(["self_guided", "self_guided"], dims=(32, 64), depths=(2, 2), img_size=28, num_classes=3).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
