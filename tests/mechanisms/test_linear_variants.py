"""Linear attentions (FLatten, RALA, L²ViT, ScatterFormer) against their quadratic N×N forms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnzoo

from conftest import rand64, randomize_


def build(name, **kwargs):
    torch.manual_seed(0)
    module = attnzoo.create(name, 16, **kwargs).double().eval()
    randomize_(module, std=0.05, perturb=True)
    return module


def quadratic(q, k, v, eps):
    """Row-normalised kernel attention with an explicit N×N score matrix per head: ``(QKᵀ)V / (QKᵀ·1 + eps)``."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    return torch.einsum("bhij,bjhe->bihe", scores, v) / (scores.sum(-1).transpose(1, 2)[..., None] + eps)


def test_focused_feature_map_keeps_the_norm_and_sharpens():
    from attnzoo.mechanisms.focused_linear import focused_feature_map

    x, scale = rand64(5, 8), rand64(8, seed=1)
    y = (F.relu(x) + 1e-6) / F.softplus(scale)
    phi = focused_feature_map(x, scale, 3.0)
    torch.testing.assert_close(phi.norm(dim=-1), y.norm(dim=-1))
    torch.testing.assert_close(phi / phi.norm(dim=-1, keepdim=True), y**3 / (y**3).norm(dim=-1, keepdim=True))


def test_focused_linear_equals_its_quadratic_form_plus_dwc():
    module = build("focused_linear", num_heads=2)
    x = rand64(2, 5, 6, 16)
    q, k, v = module.features(x)
    out = quadratic(q, k, v, 1e-6).flatten(2)
    v_map = v.permute(0, 2, 3, 1).reshape(4, 8, 5, 6)  # (b·h, d, H, W)
    local = F.conv2d(v_map, module.dwc.weight, module.dwc.bias, padding=2, groups=8)
    local = local.reshape(2, 2, 8, 30).permute(0, 3, 1, 2).flatten(2)
    expected = module.proj(out + local).reshape(x.shape)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_rank_augmented_linear_equals_its_quadratic_form():
    module = build("rank_augmented_linear", num_heads=2)
    x = rand64(2, 4, 5, 16)
    h, w, heads, d = 4, 5, 2, 8
    n = h * w
    q, k, v, o = module.qkvo(x).reshape(2, n, 4, heads, d).unbind(2)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    alpha = torch.softmax(torch.einsum("bhd,bjhd->bjh", q.mean(1), k) / math.sqrt(d), dim=1)
    k = k * alpha[..., None] * n
    theta = 1.0 / 10000 ** torch.linspace(0, 1, d // 4, dtype=torch.float64)
    rows, cols = torch.arange(n) // w, torch.arange(n) % w
    angle = torch.cat([rows[:, None] * theta, cols[:, None] * theta], dim=-1)[:, None]  # [N, 1, d/2]

    def rope(t):  # complex rotation of adjacent pairs, as LLaMA's apply_rotary_emb
        turned = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
        return torch.view_as_real(turned).flatten(-2)

    scores = torch.einsum("bihd,bjhd->bhij", rope(q), rope(k)) / n
    normaliser = torch.einsum("bihd,bhd->bhi", q, k.mean(1)) + 1e-6
    out = torch.einsum("bhij,bjhe->bihe", scores / normaliser[..., None], v).flatten(2)
    lepe = module.lepe(v.flatten(2).transpose(1, 2).reshape(2, 16, h, w)).flatten(2).transpose(1, 2)
    expected = module.proj((out + lepe) * o.flatten(2)).reshape(x.shape)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_enhanced_linear_attention_is_the_relu_kernel_form_and_lcm_adds_locally():
    module = build("enhanced_linear", num_heads=2, kernel_size=3)
    x = rand64(2, 5, 6, 16)
    q, k, v = module.qkv(x.reshape(2, 30, 16)).reshape(2, 30, 3, 2, 8).unbind(2)
    expected = quadratic(F.relu(q), F.relu(k), v, module.eps).reshape(x.shape)
    torch.testing.assert_close(module.attend(x), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        module.lcm[-1].weight.zero_()
        module.lcm[-1].bias.zero_()
    torch.testing.assert_close(module(x), module.proj(expected), rtol=1e-10, atol=1e-10)


def test_scattered_linear_equals_linear_attention_in_each_window():
    module = build("scattered_linear", num_heads=2, window_size=3)
    x = rand64(2, 7, 8, 16)  # 3×3 windows with partial ones at the borders (7 = 3+3+1, 8 = 3+3+2)
    q, k, v = module.qkv(x).reshape(2, 7, 8, 3, 2, 8).unbind(3)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    out = torch.zeros_like(v)
    for r in range(0, 7, 3):
        for c in range(0, 8, 3):
            win = (slice(None), slice(r, r + 3), slice(c, c + 3))
            qs, ks, vs = (t[win].flatten(1, 2) for t in (q, k, v))
            out[win] = quadratic(qs, ks, vs, module.eps).reshape(out[win].shape)
    expected = module.proj(out.flatten(-2))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_scattered_linear_is_confined_to_the_query_window():
    module = build("scattered_linear", num_heads=2, window_size=3)
    x = rand64(1, 7, 8, 16, grad=True)
    (grad,) = torch.autograd.grad(module(x)[0, 4, 7].sum(), x)  # window rows 3..5, columns 6..7
    inside = torch.zeros(7, 8, dtype=torch.bool)
    inside[3:6, 6:8] = True
    assert grad[0][~inside].abs().max() == 0 and grad[0][inside].abs().min() > 0
