"""Content-routed attention: bi_level_routing (BiFormer) and routing (Routing Transformer).

Expected values are computed here from first principles (equivalences with global attention, permutations).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo

TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- bi-level routing (BiFormer, Zhu et al. 2023)


def global_attention_reference(m, x):
    """SM(σ·q·kᵀ)v over all tokens with σ = qk_dim^-1/2, plus LCE(V), then wo — from the module's weights."""
    b, hh, ww, c = x.shape
    q, k, v = m.qkv(x).split([m.qk_dim, m.qk_dim, c], dim=-1)
    heads = lambda t: t.reshape(b, hh * ww, m.num_heads, -1).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=m.qk_dim**-0.5)
    o = o.transpose(1, 2).reshape(b, hh, ww, c)
    o = o + F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.lepe.padding, groups=c).permute(
        0, 2, 3, 1
    )
    return m.wo(o)


@pytest.mark.parametrize("num_windows,size", [(2, (6, 8)), (1, (5, 7)), (3, (6, 9))])
def test_bi_level_routing_with_all_regions_is_global_attention(num_windows, size):
    torch.manual_seed(4)
    m = attnzoo.create(
        "bi_level_routing", 32, num_heads=4, num_windows=num_windows, topk=num_windows * num_windows, kernel_size=3
    )
    x = torch.randn(2, *size, 32)
    torch.testing.assert_close(m(x), global_attention_reference(m, x), **TOL)


def test_bi_level_routing_padding_is_masked():
    torch.manual_seed(4)
    m = attnzoo.create("bi_level_routing", 32, num_heads=2, num_windows=2, topk=4, kernel_size=3)
    x = torch.randn(1, 5, 7, 32)  # padded to 6×8; masked padding keeps the result global attention
    torch.testing.assert_close(m(x), global_attention_reference(m, x), **TOL)


def test_bi_level_routing_only_routed_regions_matter():
    torch.manual_seed(5)
    m = attnzoo.create("bi_level_routing", 32, num_heads=2, num_windows=2, topk=1, kernel_size=0)
    x = torch.randn(1, 8, 8, 32)
    q, k, _ = m.qkv(x).split([32, 32, 32], dim=-1)
    region = lambda t: t.reshape(1, 2, 4, 2, 4, 32).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 16, 32)  # noqa: E731
    routes = m.route(region(q), region(k), torch.ones(4, 16, dtype=torch.bool))[0, :, 0]
    target = next(r for r in (1, 2, 3) if r != routes[0])  # a region that region 0 does not route to
    y = m(x)
    x2 = x.clone()  # swap two tokens inside the target region: its mean (so the routing) is unchanged
    ry, rx = divmod(target, 2)
    a, b_ = (ry * 4, rx * 4), (ry * 4 + 1, rx * 4 + 2)
    x2[0, a[0], a[1]], x2[0, b_[0], b_[1]] = x[0, b_[0], b_[1]], x[0, a[0], a[1]]
    y2 = m(x2)
    torch.testing.assert_close(y2[0, :4, :4], y[0, :4, :4], **TOL)  # region 0 does not route to the edited region


# --------------------------------------------------------------------- routing (Routing Transformer, Roy et al. 2020)


def test_routing_with_one_cluster_is_full_attention():
    torch.manual_seed(6)
    m = attnzoo.create("routing", 32, num_heads=4, num_clusters=1).eval()
    x = torch.randn(2, 10, 32)
    q, k, v = m.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(m(x), m.proj(o), **TOL)


def test_routing_eval_keeps_centroids_training_moves_them():
    torch.manual_seed(7)
    m = attnzoo.create("routing", 32, num_heads=2, num_clusters=3).eval()
    x = torch.randn(2, 12, 32)
    before = m.centroids.clone()
    y1, y2 = m(x), m(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(m.centroids, before, rtol=0, atol=0)
    m.train()(x)
    assert not torch.equal(m.centroids, before)
    moved = (m.centroids - before).norm(dim=-1)
    assert moved.max() < 2 * (1 - m.ema_decay) + 1e-6  # one EMA step: |Δμ| ≤ (1 − λ)·|mean − μ| ≤ (1 − λ)·2
    assert m.aux_loss() is not None and m.aux_loss().item() > 0 and m.aux_loss().requires_grad
    m.eval()(x)
    assert m.aux_loss() is None  # an eval-mode forward clears the last one


def test_routing_is_permutation_equivariant():
    torch.manual_seed(8)
    m = attnzoo.create("routing", 32, num_heads=2, num_clusters=3).eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    m = m.double()
    perm = torch.randperm(12)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], rtol=1e-10, atol=1e-10)
