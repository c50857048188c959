"""Properties of the linear and recurrent mechanisms (retention, lightning, linear, gated linear attention, agent,
softmax-free).

Every alternative form is compared with its defining form; expected values are computed here from first
principles (explicit sums, SDPA compositions), never from the implementation's own output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.gated_linear_2d import gla_chunked, gla_recurrent
from attnzoo.mechanisms.lightning import lightning_naive, lightning_recurrent, lightning_tiled
from attnzoo.mechanisms.linear import (
    elu_feature_map,
    linear_attention_associative,
    linear_attention_chunkwise,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from attnzoo.mechanisms.retention import retention_chunkwise, retention_parallel, retention_recurrent
from attnzoo.mechanisms.softmax_free import gaussian_kernel, newton_inverse, softmax_free_attention

TOL = dict(rtol=1e-5, atol=1e-5)


def qkv(n=13, heads=3, d=4, e=5, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, batch, n, heads, d, generator=g, dtype=dtype)
    return q, k, torch.randn(batch, n, heads, e, generator=g, dtype=dtype)


def explicit_decayed(q, k, v, decay, scale):
    """o_t = scale·Σ_{s≤t} decay_h^(t−s)(q_t·k_s)v_s, a double loop."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for t in range(q.shape[1]):
        for s in range(t + 1):
            w = scale * (q[:, t] * k[:, s]).sum(-1) * decay ** (t - s)  # [B, h]
            out[:, t] += w[..., None] * v[:, s]
    return out


def assert_causal(module, x, cut):
    """Outputs before ``cut`` do not change when tokens from ``cut`` on are perturbed."""
    y = module(x)
    x2 = x.clone()
    x2[:, cut:] += torch.randn_like(x2[:, cut:])
    y2 = module(x2)
    torch.testing.assert_close(y2[:, :cut], y[:, :cut], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y2[:, cut:], y[:, cut:])


# ---------------------------------------------------------------------- retention (RetNet, Sun et al. 2023; ViR 2023)


def test_retention_parallel_matches_explicit_sum():
    q, k, v = qkv(n=7)
    gamma = torch.tensor([0.9, 0.5, 0.97])
    torch.testing.assert_close(retention_parallel(q, k, v, gamma), explicit_decayed(q, k, v, gamma, 4**-0.5), **TOL)


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 16])
def test_retention_forms_agree(chunk):
    q, k, v = qkv(n=13)
    gamma = torch.tensor([0.0, 0.9, 1.0])
    ref = retention_parallel(q, k, v, gamma)
    torch.testing.assert_close(retention_recurrent(q, k, v, gamma), ref, **TOL)
    torch.testing.assert_close(retention_chunkwise(q, k, v, gamma, chunk_size=chunk), ref, **TOL)


def test_retention_gamma_limits():
    q, k, v = qkv(n=9, heads=2)
    s = 4**-0.5
    zero = retention_chunkwise(q, k, v, torch.zeros(2), chunk_size=4)
    torch.testing.assert_close(zero, s * (q * k).sum(-1, keepdim=True) * v, **TOL)
    one = retention_chunkwise(q, k, v, torch.ones(2), chunk_size=4)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k).tril() * s
    torch.testing.assert_close(one, torch.einsum("bhnm,bmhe->bnhe", scores, v), **TOL)


def test_retention_module_modes_agree_and_are_causal():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    outs = []
    for mode in ("quadratic", "recurrent", "chunkwise"):
        torch.manual_seed(1)
        m = attnzoo.create("retention", 32, num_heads=4, mode=mode, chunk_size=4)
        outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    torch.testing.assert_close(outs[2], outs[0], **TOL)
    assert_causal(m, x, 6)
    torch.testing.assert_close(m.gammas, torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8]))
    spatial = torch.randn(1, 3, 4, 32)  # spatial input is flattened row-major and returned in its own shape
    torch.testing.assert_close(m(spatial), m(spatial.reshape(1, 12, 32)).reshape(1, 3, 4, 32))


# ------------------------------------------------------------------- lightning (Lightning Attention, Qin et al. 2024)


@pytest.mark.parametrize("block", [1, 4, 7, 13, 20])
def test_lightning_tiled_naive_recurrent_agree(block):
    q, k, v = qkv(n=13)
    decay = torch.exp(-torch.tensor([0.5, 0.0625, 3.0]))
    ref = explicit_decayed(q, k, v, decay, 1.0)
    torch.testing.assert_close(lightning_naive(q, k, v, decay), ref, **TOL)
    torch.testing.assert_close(lightning_recurrent(q, k, v, decay), ref, **TOL)
    torch.testing.assert_close(lightning_tiled(q, k, v, decay, block), ref, **TOL)


def test_lightning_unit_decay_is_plain_causal_linear_attention():
    q, k, v = qkv(n=10)
    expected = torch.einsum("bhnm,bmhe->bnhe", torch.einsum("bnhd,bmhd->bhnm", q, k).tril(), v)
    torch.testing.assert_close(lightning_tiled(q, k, v, torch.ones(3), 4), expected, **TOL)


def test_lightning_module_modes_causality_and_bidirectional():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    outs = {}
    for mode in ("chunkwise", "quadratic", "recurrent"):
        torch.manual_seed(1)
        outs[mode] = attnzoo.create("lightning", 32, num_heads=4, mode=mode, chunk_size=3)
    ys = {mode: m(x) for mode, m in outs.items()}
    torch.testing.assert_close(ys["quadratic"], ys["chunkwise"], **TOL)
    torch.testing.assert_close(ys["recurrent"], ys["chunkwise"], **TOL)
    assert_causal(outs["chunkwise"], x, 5)
    torch.testing.assert_close(outs["chunkwise"].decay, torch.exp(-torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])))

    # is_causal=False: o_t = Σ_s λ^|t−s| (q_t·k_s) v_s, checked against the explicit symmetric sum
    torch.manual_seed(1)
    m = attnzoo.create("lightning", 32, num_heads=4, is_causal=False, chunk_size=4)
    q, k, v, u = m.qkvu(x).unflatten(-1, (4, 4, 8)).unbind(2)
    q, k = F.silu(q), F.silu(k)
    gap = (torch.arange(11)[:, None] - torch.arange(11)[None, :]).abs()
    scores = torch.einsum("bthd,bshd->bhts", q, k) * m.decay[:, None, None] ** gap
    o = torch.einsum("bhts,bshe->bthe", scores, v).flatten(2)
    expected = m.proj(F.rms_norm(o, (32,)) * u.flatten(2))
    torch.testing.assert_close(m(x), expected, **TOL)


# ---------------------------------------------------------- linear (Transformers are RNNs, Katharopoulos et al. 2020)


def test_linear_quadratic_equals_associative_and_rows_are_stochastic():
    q, k, v = qkv(n=12)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    torch.testing.assert_close(linear_attention_associative(fq, fk, v), linear_attention_quadratic(fq, fk, v), **TOL)
    # implied attention rows: feed v = identity over tokens
    eye = torch.eye(12).expand(2, 3, 12, 12).permute(0, 2, 1, 3)
    rows = linear_attention_associative(fq, fk, eye)  # [B, N, h, N]: row i of the attention map
    assert (rows >= 0).all()
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 12, 3), rtol=1e-5, atol=1e-5)
    expected = torch.einsum("bihd,bjhd->bihj", fq, fk)
    torch.testing.assert_close(rows, expected / (expected.sum(-1, keepdim=True) + 1e-6), **TOL)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])
def test_linear_causal_forms_agree(chunk):
    q, k, v = qkv(n=12)
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    ref = linear_attention_quadratic(fq, fk, v, is_causal=True)
    torch.testing.assert_close(linear_attention_recurrent(fq, fk, v), ref, **TOL)
    torch.testing.assert_close(linear_attention_chunkwise(fq, fk, v, chunk_size=chunk), ref, **TOL)
    first = (fq[:, 0] * fk[:, 0]).sum(-1, keepdim=True)
    torch.testing.assert_close(ref[:, 0], first * v[:, 0] / (first + 1e-6), **TOL)  # token 0 sees itself only


def test_linear_module_modes_and_causality():
    x = torch.randn(2, 10, 32)
    ys = []
    for mode in ("chunkwise", "recurrent", "quadratic"):
        torch.manual_seed(2)
        m = attnzoo.create("linear", 32, is_causal=True, mode=mode, chunk_size=3)
        ys.append(m(x))
    torch.testing.assert_close(ys[1], ys[0], **TOL)
    torch.testing.assert_close(ys[2], ys[0], **TOL)
    assert_causal(m, x, 4)
    with pytest.raises(ValueError, match="mode='recurrent'"):
        attnzoo.create("linear", 32, mode="recurrent")


# --------------------------------------------------------------------- gated linear attention (ViG, Liao et al. 2024)


def test_gla_recurrent_matches_explicit_sum():
    q, k, v = qkv(n=6, heads=2, d=3, e=4)
    log_decay = F.logsigmoid(torch.randn(2, 6, 2, 3))
    expected = torch.zeros(2, 6, 2, 4)
    for t in range(6):
        for s in range(t + 1):
            decay = log_decay[:, s + 1 : t + 1].sum(1).exp()  # Π_{u=s+1..t} exp(α_u), per key channel
            w = (q[:, t] * 3**-0.5 * decay * k[:, s]).sum(-1)
            expected[:, t] += w[..., None] * v[:, s]
    torch.testing.assert_close(gla_recurrent(q, k, v, log_decay), expected, **TOL)


@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 32])
def test_gla_chunked_equals_recurrent(chunk):
    q, k, v = qkv(n=13)
    log_decay = F.logsigmoid(3 * torch.randn(2, 13, 3, 4))  # strong gates: exponents down to about −10 per step
    torch.testing.assert_close(
        gla_chunked(q, k, v, log_decay, chunk_size=chunk), gla_recurrent(q, k, v, log_decay), **TOL
    )


def test_gated_linear_2d_modes_agree_and_zero_gate_is_local_path():
    x = torch.randn(2, 4, 5, 32)
    torch.manual_seed(3)
    chunked = attnzoo.create("gated_linear_2d", 32, num_heads=2, chunk_size=3)
    torch.manual_seed(3)
    recurrent = attnzoo.create("gated_linear_2d", 32, num_heads=2, mode="recurrent")
    torch.testing.assert_close(chunked(x), recurrent(x), **TOL)
    with torch.no_grad():
        chunked.locality_gate.weight.zero_()
        chunked.locality_gate.bias.fill_(-200.0)  # G = σ(−200) = 0 in fp32
    x_l = F.silu(F.conv2d(x.permute(0, 3, 1, 2), chunked.local.weight, padding=1, groups=32)).permute(0, 2, 3, 1)
    heads = x_l.unflatten(-1, (2, 16))
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * chunked.norm_local.weight
    torch.testing.assert_close(chunked(x), chunked.proj(normed.flatten(-2)), **TOL)


# --------------------------------------------------------------------------- agent (Agent Attention, Han et al. 2023)


def test_agent_without_biases_and_dwconv_is_two_chained_attentions():
    torch.manual_seed(9)
    m = attnzoo.create("agent", 32, num_heads=4, num_agents=4, input_resolution=(6, 6))
    with torch.no_grad():
        for p in [*m.bias_parameters(), m.dwc.weight, m.dwc.bias]:
            p.zero_()
    x = torch.randn(2, 6, 7, 32)  # another width: the row/column tables are resized
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)  # [B, 4, C]
    heads = lambda t: t.reshape(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
    agent_values = F.scaled_dot_product_attention(heads(agents), heads(k.flatten(1, 2)), heads(v.flatten(1, 2)))
    o = F.scaled_dot_product_attention(heads(q.flatten(1, 2)), heads(agents), agent_values)
    expected = m.proj(o.transpose(1, 2).reshape(2, 6, 7, 32))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_agent_position_bias_layout():
    torch.manual_seed(10)
    m = attnzoo.create("agent", 32, num_heads=2, num_agents=4, input_resolution=(7, 7))
    b1, b2 = m.position_biases(7, 7, torch.float32)
    # at the table's own size the 7×7 table is used as is: B₁[a, (y, x)] = P₁[a, y, x] + bh₁[a, y] + bw₁[a, x]
    expected = m.agent_key_table[1, 3, 2, 5] + m.agent_row_bias[1, 3, 2] + m.agent_col_bias[1, 3, 5]
    torch.testing.assert_close(b1[0, 1, 3, 2 * 7 + 5], expected)
    expected = m.query_agent_table[0, 2, 6, 1] + m.row_agent_bias[0, 2, 6] + m.col_agent_bias[0, 2, 1]
    torch.testing.assert_close(b2[0, 0, 6 * 7 + 1, 2], expected)


# -------------------------------------------------------------------------------- softmax-free (SOFT, Lu et al. 2021)


def test_newton_inverse_approaches_pinv():
    torch.manual_seed(11)
    points = torch.randn(3, 10, 6)
    p = gaussian_kernel(points, points).double()
    assert torch.allclose(p, p.transpose(-1, -2)) and (p > 0).all() and (p <= 1).all()
    residuals = [torch.linalg.matrix_norm(torch.eye(10) - newton_inverse(p, t) @ p).max() for t in (2, 8, 30)]
    assert residuals[0] > residuals[1] > residuals[2] and residuals[2] < 1e-8
    torch.testing.assert_close(newton_inverse(p, 30), torch.linalg.pinv(p), rtol=1e-6, atol=1e-8)


def test_newton_inverse_gradient_is_that_of_the_inverse():
    torch.manual_seed(12)
    points = torch.randn(8, 5, dtype=torch.float64)
    p = gaussian_kernel(points, points).requires_grad_()
    g = torch.randn(8, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad((newton_inverse(p, 40) * g).sum(), p)
    (expected,) = torch.autograd.grad((torch.linalg.inv(p) * g).sum(), p)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


def test_softmax_free_with_all_tokens_as_landmarks_is_exact_kernel_attention():
    torch.manual_seed(13)
    q = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    expected = torch.exp(-0.5 * torch.cdist(q, q).pow(2)) @ v
    torch.testing.assert_close(softmax_free_attention(q, q, v, iters=60), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- numerics


SCANS = {
    "linear": lambda q, k, v, g: linear_attention_associative(elu_feature_map(q), elu_feature_map(k), v),
    "linear_causal": lambda q, k, v, g: linear_attention_chunkwise(
        elu_feature_map(q), elu_feature_map(k), v, chunk_size=256
    ),
    "retention": lambda q, k, v, g: retention_chunkwise(q, k, v, torch.tensor([0.999, 1.0]), chunk_size=256),
    "lightning": lambda q, k, v, g: lightning_tiled(q, k, v, torch.tensor([0.999, 1.0]), 512),
    "gla": lambda q, k, v, g: gla_chunked(q, k, v, g, chunk_size=256),
}


@pytest.mark.parametrize("scan", sorted(SCANS))
def test_scans_stay_finite_in_half_precision_for_long_inputs(scan):
    n = 64 * 64  # a 64×64 token map: sums over 4096 tokens, decays down to γ^4095
    q, k, v = qkv(n=n, heads=2, d=4, e=4, batch=1, seed=14)
    log_decay = F.logsigmoid(torch.randn(1, n, 2, 4)) / 16
    ref = SCANS[scan](q, k, v, log_decay)
    for dtype in (torch.float16, torch.bfloat16):
        y = SCANS[scan](q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all(), dtype
        err = (y.float() - ref).norm() / ref.norm()
        assert err < 0.05, (dtype, float(err))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("retention", {"num_heads": 2}),
        ("lightning", {"num_heads": 2}),
        ("linear", {"num_heads": 2, "is_causal": True}),
        ("gated_linear_2d", {"num_heads": 2, "chunk_size": 256}),
        ("agent", {"num_heads": 2}),
        ("softmax_free", {"num_heads": 2}),
        ("bi_level_routing", {"num_heads": 2, "num_windows": 8}),
        ("routing", {"num_heads": 2, "num_clusters": 64}),
    ],
)
def test_modules_finite_in_bfloat16_at_64x64(name, kwargs):
    torch.manual_seed(15)
    m = attnzoo.create(name, 16, **kwargs).eval()
    x = torch.randn(1, 64, 64, 16)
    with torch.no_grad():
        ref = m(x)
        y = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert torch.isfinite(y).all()
    # routing's top-k cluster membership flips under bf16 rounding of q, k: a looser bound there
    assert (y.float() - ref).norm() / ref.norm() < (0.2 if name == "routing" else 0.1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="chunk_size=0"):
        attnzoo.create("retention", 32, chunk_size=0)
    with pytest.raises(ValueError, match="num_agents=5"):
        attnzoo.create("agent", 32, num_agents=5)
    with pytest.raises(ValueError, match="topk=50"):
        attnzoo.create("bi_level_routing", 32, topk=50)
    with pytest.raises(ValueError, match="ratio=8"):
        attnzoo.create("softmax_free", 32)(torch.randn(1, 5, 9, 32))
    with pytest.raises(ValueError, match="mode='fast'"):
        attnzoo.create("gated_linear_2d", 32, mode="fast")
    assert math.isfinite(attnzoo.create("lightning", 32, num_heads=4, layer_index=3, num_layers=4).decay.sum().item())
