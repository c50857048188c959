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
        turned = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous()) * torch.polar(
            torch.ones_like(angle), angle
        )
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


def segment_linear_attention(q, k, v, segments, num_segments, eps):
    """The per-token form scattered_linear was first written in: every token's outer product ``φk_j v_jᵀ`` and key
    scatter-added into its segment's state (``index_add``), each query reading its own segment's state."""
    outer = torch.einsum("bnhd,bnhe->bnhde", k, v)
    states = outer.new_zeros(k.shape[0], num_segments, *outer.shape[2:]).index_add(1, segments, outer)
    totals = k.new_zeros(k.shape[0], num_segments, *k.shape[2:]).index_add(1, segments, k)
    numerator = torch.einsum("bnhd,bnhde->bnhe", q, states[:, segments])
    return numerator / (torch.einsum("bnhd,bnhd->bnh", q, totals[:, segments]) + eps).unsqueeze(-1)


def test_window_linear_attention_equals_the_per_token_segment_sums():
    from attnzoo.mechanisms.scattered_linear import window_linear_attention

    for (height, width), window in (((7, 8), 3), ((6, 6), 3), ((5, 4), 1), ((3, 5), 7), ((9, 2), 4)):
        q, k = (rand64(2, height, width, 2, 4, seed=s).abs() for s in (0, 1))
        v = rand64(2, height, width, 2, 3, seed=2)
        rows, cols = torch.arange(height) // window, torch.arange(width) // window
        per_row = -(-width // window)
        segments = (rows[:, None] * per_row + cols[None, :]).reshape(-1)
        flat = (t.flatten(1, 2) for t in (q, k, v))
        expected = segment_linear_attention(*flat, segments, -(-height // window) * per_row, 1e-6)
        out = window_linear_attention(q, k, v, window, 1e-6)
        torch.testing.assert_close(out, expected.reshape(out.shape), rtol=1e-10, atol=1e-10)


def test_scattered_linear_in_bands_of_window_rows_equals_the_whole_grid(monkeypatch):
    from attnzoo.mechanisms import _base

    module = build("scattered_linear", num_heads=2, window_size=3)
    x = rand64(2, 11, 8, 16)
    whole = module(x)
    row_bytes = 2 * 8 * 3 * 16 * 8  # batch · width · qkv channels · float64
    monkeypatch.setattr(_base, "CPU_BLOCK_BYTES", 7 * row_bytes)  # bands of 6 rows: 6 + 5
    assert [(r.start, r.stop) for r in _base.cpu_blocks(11, row_bytes, x.device, 3)] == [(0, 6), (6, 11)]
    torch.testing.assert_close(module(x), whole, rtol=1e-12, atol=1e-12)
