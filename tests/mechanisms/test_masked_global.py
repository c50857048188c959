"""Masked global attentions (GMM mask, polyline path mask, iLLaMA causal) against hand-written masks and MHSA."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import attnzoo

from conftest import hand_attention, rand64, randomize_


def build(name, **kwargs):
    torch.manual_seed(0)
    module = attnzoo.create(name, 16, **kwargs).double().eval()
    randomize_(module, std=0.05, perturb=True)
    return module


def test_gaussian_mixture_mask_equals_attention_with_a_hand_built_mask():
    module = build("gaussian_mixture_mask", num_heads=2, num_gaussians=3)
    h, w = 4, 5
    x = rand64(2, h, w, 16)
    bias = torch.zeros(2, 20, 20, dtype=torch.float64)
    for head in range(2):
        for i in range(20):
            for j in range(20):
                d2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
                for a, log_s in zip(module.alpha[head], module.log_sigma[head]):
                    bias[head, i, j] += a.item() * math.exp(-d2 / (2 * math.exp(2 * log_s.item())))
    q, k, v = module.qkv(x.reshape(2, 20, 16)).reshape(2, 20, 3, 2, 8).unbind(2)
    out, _ = hand_attention(q, k, v, 8**-0.5, bias=bias.expand(2, -1, -1, -1))
    expected = module.proj(out.flatten(2)).reshape(x.shape)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_gaussian_mixture_mask_prefers_near_keys_when_its_weights_are_positive():
    module = build("gaussian_mixture_mask", num_heads=2, num_gaussians=2)
    mask = module.mask(6, 6, torch.float64)
    assert bool((mask[:, 0, 1] > mask[:, 0, 35]).all())  # neighbour beats the far corner


def hand_polyline_mask(alpha, beta):
    """For query (i, j), key (i', j'): Σ alpha on row i over the columns after j up to j' (either direction), then
    Σ beta on column j' over the rows after i up to i'."""
    b, h, height, width = alpha.shape
    n = height * width
    mask = torch.zeros(b, h, n, n, dtype=alpha.dtype)
    for i in range(height):
        for j in range(width):
            for i2 in range(height):
                for j2 in range(width):
                    cols = range(j + 1, j2 + 1) if j2 >= j else range(j2 + 1, j + 1)
                    rows = range(i + 1, i2 + 1) if i2 >= i else range(i2 + 1, i + 1)
                    total = sum((alpha[:, :, i, c] for c in cols), torch.zeros(b, h, dtype=alpha.dtype))
                    total = total + sum((beta[:, :, r, j2] for r in rows), torch.zeros(b, h, dtype=alpha.dtype))
                    mask[:, :, i * width + j, i2 * width + j2] = total
    return mask


def test_polyline_path_mask_follows_the_row_then_column_path():
    from attnzoo.mechanisms.polyline_path_mask import polyline_path_mask

    alpha, beta = -rand64(2, 2, 3, 4).abs(), -rand64(2, 2, 3, 4, seed=1).abs()
    torch.testing.assert_close(polyline_path_mask(alpha, beta), hand_polyline_mask(alpha, beta), rtol=1e-12, atol=1e-12)


def test_polyline_path_mask_attention_equals_the_two_masked_softmaxes():
    module = build("polyline_path_mask", num_heads=2)
    h, w = 3, 4
    x = rand64(2, h, w, 16)
    q, k, v = (p(x).reshape(2, 12, 2, 8) for p in (module.q_proj, module.k_proj, module.v_proj))
    theta = 1.0 / 10000 ** torch.linspace(0, 1, 4, dtype=torch.float64)
    angle = (torch.arange(12, dtype=torch.float64)[:, None] * theta)[:, None]

    def rope(t):
        turned = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous()) * torch.polar(
            torch.ones_like(angle), angle
        )
        return torch.view_as_real(turned).flatten(-2)

    dt = module.dt_linear(x.reshape(2, h, w, 2, 8))
    decay = F.softplus(dt + module.dt_bias[:, None]) * -torch.exp(module.A_log)[:, None]
    mask = hand_polyline_mask(decay[..., 0].permute(0, 3, 1, 2), decay[..., 1].permute(0, 3, 1, 2))
    out1, _ = hand_attention(rope(q), rope(k), v, 8**-0.5, bias=mask)
    out2, _ = hand_attention(rope(q), rope(k), v, 8**-0.5, bias=mask.transpose(-1, -2))
    out = (0.5 * out1 + 0.5 * out2).reshape(2, h, w, 16)
    lepe = module.lepe(v.reshape(2, h, w, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(module(x), module.out_proj(out + lepe), rtol=1e-10, atol=1e-10)


def test_causal_image_without_rope_is_mhsa_with_the_engine_causal_mask():
    module = build("causal_image", num_heads=2, rope=False)
    reference = attnzoo.create("mhsa", 16, num_heads=2, is_causal=True).double().eval()
    reference.load_state_dict(module.state_dict())
    x = rand64(2, 3, 4, 16)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)


def test_causal_image_with_rope_equals_hand_causal_attention_on_rotated_queries_and_keys():
    module = build("causal_image", num_heads=2)
    x = rand64(2, 10, 16, grad=True)
    q, k, v = module.qkv(x).reshape(2, 10, 3, 2, 8).unbind(2)
    freqs = torch.outer(
        torch.arange(10, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    )[:, None]

    def rope(t):  # LLaMA's apply_rotary_emb
        return torch.view_as_real(
            torch.view_as_complex(t.reshape(2, 10, 2, 4, 2).contiguous()) * torch.polar(torch.ones_like(freqs), freqs)
        ).flatten(-2)

    allowed = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 2, -1, -1)
    out, _ = hand_attention(rope(q), rope(k), v, 8**-0.5, allowed=allowed)
    torch.testing.assert_close(module(x), module.proj(out.flatten(2)), rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(module(x)[:, 3].sum(), x)
    assert grad[:, 4:].abs().max() == 0 and grad[:, :4].abs().min() > 0


def test_causal_image_soft_mask_mixes_bidirectional_and_causal_attention_in_training_only():
    module = build("causal_image", num_heads=2, rope=False)
    bidirectional = attnzoo.create("mhsa", 16, num_heads=2).double()
    bidirectional.load_state_dict(module.state_dict())
    causal = copy.deepcopy(module)
    x = rand64(1, 9, 16)
    module.set_soft_mask_rate(0.25)
    module.train()
    expected = 0.25 * bidirectional(x) + 0.75 * causal(x)  # the output projection is affine: weights 0.25 + 0.75 = 1
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    module.eval()
    torch.testing.assert_close(module(x), causal(x), rtol=0, atol=0)
