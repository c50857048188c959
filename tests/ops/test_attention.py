"""``attnzoo.ops.attention`` against a hand-written softmax, and ``merge_attentions`` against one joint softmax."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo.ops as ops

from conftest import hand_attention, rand64

SHAPES = [
    dict(q=(2, 5, 3, 4), k=(2, 5, 3, 4), dv=4),  # 1-D self-attention
    dict(q=(1, 3, 4, 2, 8), k=(1, 3, 4, 2, 8), dv=5),  # 2-D, dv != d
    dict(q=(2, 6, 2, 4), k=(2, 2, 3, 2, 4), dv=3),  # cross-attention: different token layouts
]


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=["1d", "2d", "cross"])
def test_attention_matches_hand_softmax(shape, return_lse):
    q = rand64(*shape["q"], seed=1)
    k = rand64(*shape["k"], seed=2)
    v = rand64(*shape["k"][:-1], shape["dv"], seed=3)
    res = ops.attention(q, k, v, return_lse=return_lse)
    exp_out, exp_lse = hand_attention(q, k, v, q.shape[-1] ** -0.5)
    out = res[0] if return_lse else res
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], exp_lse, rtol=1e-10, atol=1e-12)
    # explicit scale (and scale=0.0 must not be mistaken for None: uniform weights)
    torch.testing.assert_close(
        ops.attention(q, k, v, scale=0.3), hand_attention(q, k, v, 0.3)[0], rtol=1e-10, atol=1e-12
    )
    uniform = ops.attention(q, k, v, scale=0.0)
    mean_v = v.reshape(v.shape[0], -1, *v.shape[-2:]).mean(1)
    torch.testing.assert_close(
        uniform, mean_v.reshape(v.shape[0], *([1] * (q.dim() - 3)), *v.shape[-2:]).expand_as(uniform)
    )


MASK_SHAPES = ["full", "per_head", "per_batch", "2d"]


def _mask_shape(kind, B, h, nq, nk):
    return {"full": (B, h, nq, nk), "per_head": (1, h, nq, nk), "per_batch": (B, 1, nq, nk), "2d": (nq, nk)}[kind]


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("kind", MASK_SHAPES)
def test_attention_bool_mask(kind, return_lse):
    B, h, nq, nk = 2, 3, 6, 7
    q, k, v = rand64(B, nq, h, 4, seed=4), rand64(B, nk, h, 4, seed=5), rand64(B, nk, h, 2, seed=6)
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(_mask_shape(kind, B, h, nq, nk), generator=g) < 0.6
    mask[..., 0] = True  # every query keeps a key (SDPA returns NaN for an empty row)
    res = ops.attention(q, k, v, attn_mask=mask, return_lse=return_lse)
    exp_out, exp_lse = hand_attention(q, k, v, 0.5, allowed=mask.expand(B, h, nq, nk))
    torch.testing.assert_close(res[0] if return_lse else res, exp_out, rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], exp_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("kind", MASK_SHAPES)
def test_attention_float_mask(kind, return_lse):
    B, h, nq, nk = 2, 2, 5, 6
    q, k, v = rand64(B, nq, h, 4, seed=8), rand64(B, nk, h, 4, seed=9), rand64(B, nk, h, 3, seed=10)
    bias = rand64(*_mask_shape(kind, B, h, nq, nk), seed=11)
    bias[..., 1] = float("-inf")  # an additive -inf removes the key
    res = ops.attention(q, k, v, attn_mask=bias, return_lse=return_lse)
    allowed = torch.isfinite(bias).expand(B, h, nq, nk)
    exp_out, exp_lse = hand_attention(q, k, v, 0.5, allowed=allowed, bias=bias.expand(B, h, nq, nk))
    torch.testing.assert_close(res[0] if return_lse else res, exp_out, rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], exp_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
def test_attention_is_causal(return_lse):
    B, h, n = 2, 2, 7
    q, k, v = rand64(B, n, h, 4, seed=12), rand64(B, n, h, 4, seed=13), rand64(B, n, h, 3, seed=14)
    res = ops.attention(q, k, v, is_causal=True, return_lse=return_lse)
    tril = torch.ones(n, n, dtype=torch.bool).tril().expand(B, h, n, n)
    exp_out, exp_lse = hand_attention(q, k, v, 0.5, allowed=tril)
    torch.testing.assert_close(res[0] if return_lse else res, exp_out, rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], exp_lse, rtol=1e-10, atol=1e-12)
    # the first query sees only the first key
    torch.testing.assert_close((res[0] if return_lse else res)[:, 0], v[:, 0])


def test_attention_is_causal_paths_agree_for_rectangular_scores():
    """With N_q != N_k the SDPA path (no lse) and the explicit path (lse) both align the causal mask top-left
    (query i sees keys 0..i), as ``scaled_dot_product_attention`` does."""
    q, k, v = rand64(1, 4, 2, 4, seed=15), rand64(1, 6, 2, 4, seed=16), rand64(1, 6, 2, 3, seed=17)
    plain = ops.attention(q, k, v, is_causal=True)
    with_lse, lse = ops.attention(q, k, v, is_causal=True, return_lse=True)
    top_left = torch.ones(4, 6, dtype=torch.bool).tril().expand(1, 2, 4, 6)
    exp_out, exp_lse = hand_attention(q, k, v, 0.5, allowed=top_left)
    torch.testing.assert_close(plain, exp_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(with_lse, exp_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-12)


def test_attention_all_keys_masked_gives_zero_and_neg_inf_lse():
    q, k, v = (
        rand64(1, 3, 1, 4, seed=18, grad=True),
        rand64(1, 4, 1, 4, seed=19, grad=True),
        rand64(1, 4, 1, 2, seed=20, grad=True),
    )
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out, lse = ops.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.isneginf(lse[0, 1]).all() and torch.isfinite(lse[0, [0, 2]]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 1], torch.zeros_like(grads[0][0, 1]))


def test_attention_all_keys_masked_by_float_bias_has_finite_gradients():
    """An additive -inf bias that removes every key of a query (unlike a bool mask, the -inf reaches the logits
    through an addition, so a NaN in the logsumexp backward would reach q, k and the bias)."""
    q, k, v = (rand64(1, n, 1, d, seed=s, grad=True) for n, d, s in ((3, 4, 18), (4, 4, 19), (4, 2, 20)))
    bias = torch.zeros(3, 4, dtype=torch.float64)
    bias[1] = float("-inf")
    bias.requires_grad_(True)
    out, lse = ops.attention(q, k, v, attn_mask=bias, return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and torch.isneginf(lse[0, 1]).all()
    grads = torch.autograd.grad(out.sum() + lse[0, [0, 2]].sum(), (q, k, v, bias))
    for name, grad in zip(["q", "k", "v", "attn_mask"], grads):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
    assert torch.equal(grads[0][0, 1], torch.zeros_like(grads[0][0, 1]))


@pytest.mark.parametrize("case", ["unequal widths", "bias with a gradient"])
def test_attention_auto_explicit_scores_path(case):
    """On CPU ``auto`` computes explicit scores where SDPA would need padded copies or its math path (an additive
    bias with unequal q/k and v widths, or a bias that needs a gradient); values and gradients are the textbook
    ones, and the record says which path ran."""
    width_v = 6 if case == "unequal widths" else 4
    q, k, v = (rand64(2, 5, 2, d, seed=s, grad=True) for d, s in ((4, 21), (4, 22), (width_v, 23)))
    bias = rand64(2, 2, 5, 5, seed=24, grad=case == "bias with a gradient")
    with ops.record_backends() as runs:
        out = ops.attention(q, k, v, attn_mask=bias, scale=0.7)
    assert runs == [("attention", "explicit")]
    expected, _ = hand_attention(q, k, v, 0.7, bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    inputs = (q, k, v, bias) if bias.requires_grad else (q, k, v)
    grads = torch.autograd.grad((out * out).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * expected).sum(), inputs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_auto_keeps_sdpa_for_a_bias_that_masks_a_whole_row():
    """A -inf row in the bias would make a plain softmax NaN; ``auto`` keeps SDPA there, and the row is 0."""
    q, k, v = (rand64(1, 4, 1, d, seed=s) for d, s in ((4, 25), (4, 26), (6, 27)))
    bias = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    bias[0, 0, 2] = float("-inf")
    with ops.record_backends() as runs:
        out = ops.attention(q, k, v, attn_mask=bias)
    assert runs == [("attention", "sdpa")]
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2])) and torch.isfinite(out).all()


def test_attention_auto_explicit_scores_with_partly_masked_rows():
    """-inf entries that leave every query a key (Swin's shifted-window regions, here broadcast over the batch as
    a stride-0 view) are exact in a plain softmax: ``auto`` takes the explicit path, values and gradients (the
    bias's included, zero where masked) are the textbook ones."""
    q, k, v = (rand64(3, 5, 2, 4, seed=s, grad=True) for s in (28, 29, 30))
    table = rand64(1, 2, 5, 5, seed=31, grad=True)
    region = torch.zeros(5, 5, dtype=torch.float64)
    region[:2, 2:] = region[2:, :2] = float("-inf")  # two regions; the diagonal is always allowed
    bias = (table + region).expand(3, 2, 5, 5)
    with ops.record_backends() as runs:
        out = ops.attention(q, k, v, attn_mask=bias)
    assert runs == [("attention", "explicit")]
    expected, _ = hand_attention(q, k, v, 0.5, bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v, table))
    expected_grads = torch.autograd.grad((expected * expected).sum(), (q, k, v, table))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(grads[3][0, :, :2, 2:], torch.zeros(2, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_attention_mask_and_is_causal_both_apply(kind, return_lse):
    B, h, n = 2, 2, 5
    q, k, v = rand64(B, n, h, 4, seed=40), rand64(B, n, h, 4, seed=41), rand64(B, n, h, 3, seed=42)
    allowed = torch.rand(B, 1, n, n, generator=torch.Generator().manual_seed(43)) > 0.3
    allowed[..., 0] = True  # every query keeps key 0, which the causal mask never removes
    bias = torch.zeros(B, 1, n, n, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    mask = allowed if kind == "bool" else bias
    res = ops.attention(q, k, v, attn_mask=mask, is_causal=True, return_lse=return_lse)
    both = (allowed & torch.ones(n, n, dtype=torch.bool).tril()).expand(B, h, n, n)
    exp_out, exp_lse = hand_attention(q, k, v, 0.5, allowed=both)
    torch.testing.assert_close(res[0] if return_lse else res, exp_out, rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], exp_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize(
    "mask,exc,fragments",
    [
        (torch.ones(3, 4, dtype=torch.bool), ValueError, ["attn_mask.shape=(3, 4)", "N_k] = [2, 2, 5, 4]"]),
        (torch.ones(2, 2, 2, 5, 4), ValueError, ["attn_mask.shape=(2, 2, 2, 5, 4)", "[2, 2, 5, 4]"]),
        (torch.ones(3, 1, 1, 1), ValueError, ["attn_mask.shape=(3, 1, 1, 1)"]),
        (torch.ones(5, 4, dtype=torch.long), TypeError, ["attn_mask.dtype=torch.int64"]),
        ([[True]], TypeError, ["attn_mask", "list"]),
    ],
    ids=["wrong_nq", "too_many_dims", "wrong_batch", "int_dtype", "not_tensor"],
)
def test_attention_rejects_bad_attn_mask(mask, exc, fragments, return_lse, monkeypatch):
    def no_heavy_work(*args, **kwargs):
        raise AssertionError("attention reached its matmul/SDPA before rejecting attn_mask")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_heavy_work)
    monkeypatch.setattr(torch, "matmul", no_heavy_work)
    q, k, v = rand64(2, 5, 2, 4), rand64(2, 4, 2, 4), rand64(2, 4, 2, 3)
    with pytest.raises(exc) as info:
        ops.attention(q, k, v, attn_mask=mask, return_lse=return_lse)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("return_lse", [False, True])
def test_attention_accepts_broadcastable_masks(return_lse):
    q, k, v = rand64(2, 5, 2, 4, seed=44), rand64(2, 4, 2, 4, seed=45), rand64(2, 4, 2, 3, seed=46)
    for shape in [(4,), (5, 1), (2, 1, 5, 4), (1, 2, 1, 4), (2, 2, 5, 4)]:
        bias = rand64(*shape, seed=47)
        res = ops.attention(q, k, v, attn_mask=bias, return_lse=return_lse)
        exp_out, _ = hand_attention(q, k, v, 0.5, bias=bias.expand(2, 2, 5, 4))
        torch.testing.assert_close(res[0] if return_lse else res, exp_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
def test_attention_dropout_zeroes_or_rescales_each_weight(return_lse):
    """With v = identity over keys the output rows are the attention weights: after dropout each one is either 0
    or weight / (1 - p); the lse is the undropped one; dropout_p=0 changes nothing."""
    B, h, nq, nk, p = 2, 2, 6, 8, 0.5
    q, k = rand64(B, nq, h, 4, seed=48), rand64(B, nk, h, 4, seed=49)
    v = torch.eye(nk, dtype=torch.float64)[None, :, None, :].expand(B, nk, h, nk).contiguous()
    weights, ref_lse = hand_attention(q, k, v, 0.5)
    no_dropout = ops.attention(q, k, v, return_lse=return_lse, dropout_p=0.0)
    assert torch.equal(no_dropout[0], ops.attention(q, k, v, return_lse=return_lse)[0])
    torch.manual_seed(50)
    res = ops.attention(q, k, v, return_lse=return_lse, dropout_p=p)
    out = res[0] if return_lse else res
    kept = out != 0
    assert 0 < kept.sum() < kept.numel(), "dropout at p=0.5 must drop some weights and keep others"
    torch.testing.assert_close(out[kept], weights[kept] / (1 - p), rtol=1e-10, atol=1e-12)
    if return_lse:
        torch.testing.assert_close(res[1], ref_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_attention_rejects_bad_dropout_p(dropout_p):
    q = rand64(1, 3, 1, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, q, q, dropout_p=dropout_p)


def test_attention_half_lse_is_float32():
    q = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    out, lse = ops.attention(q, q, q, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = hand_attention(q.double(), q.double(), q.double(), 8**-0.5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------------------
# merge_attentions


def _split_keys(n_keys, n_sets, seed):
    perm = torch.randperm(n_keys, generator=torch.Generator().manual_seed(seed))
    sizes = [n_keys // n_sets + (i < n_keys % n_sets) for i in range(n_sets)]
    return list(torch.split(perm, sizes))


@pytest.mark.parametrize("n_sets", [2, 3])
@pytest.mark.parametrize("with_empty_set", [False, True])
def test_merge_equals_attention_over_union(n_sets, with_empty_set):
    B, nq, nk, h, d, dv = 2, 5, 9, 2, 4, 3
    leaves = [
        rand64(B, nq, h, d, seed=21, grad=True),
        rand64(B, nk, h, d, seed=22, grad=True),
        rand64(B, nk, h, dv, seed=23, grad=True),
    ]
    q, k, v = leaves
    outs, lses = [], []
    for idx in _split_keys(nk, n_sets, seed=24):
        o, lse_set = ops.attention(q, k[:, idx], v[:, idx], return_lse=True)
        outs.append(o)
        lses.append(lse_set)
    if with_empty_set:
        # a set whose every key is masked out: output 0, lse -inf; it must contribute nothing
        o, lse_set = ops.attention(
            q, k[:, :2], v[:, :2], attn_mask=torch.zeros(nq, 2, dtype=torch.bool), return_lse=True
        )
        assert torch.isneginf(lse_set).all()
        outs.insert(1, o)
        lses.insert(1, lse_set)
    out, lse = ops.merge_attentions(outs, lses)
    ref_out, ref_lse = ops.attention(q, k, v, return_lse=True)
    exp_out, exp_lse = hand_attention(q.detach(), k.detach(), v.detach(), d**-0.5)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-12)
    # gradients through both the output and the lse
    g = torch.Generator().manual_seed(25)
    go, gl = (
        torch.randn(out.shape, generator=g, dtype=torch.float64),
        torch.randn(lse.shape, generator=g, dtype=torch.float64),
    )
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_lse * gl).sum(), leaves)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert torch.isfinite(a).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_merge_formula_and_lse_gradients():
    """Direct check of out = Σ exp(lse_i - lse) o_i with lse = log Σ exp(lse_i), including d/d lse_i."""
    o1, o2 = rand64(3, 4, seed=26, grad=True), rand64(3, 4, seed=27, grad=True)
    l1 = torch.tensor([0.5, -1.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor([1.5, 2.0, 0.25], dtype=torch.float64, requires_grad=True)
    out, lse = ops.merge_attentions([o1, o2], [l1, l2])
    w1 = [math.exp(0.5) / (math.exp(0.5) + math.exp(1.5)), math.exp(-1.0) / (math.exp(-1.0) + math.exp(2.0)), 0.0]
    expected_lse = torch.tensor(
        [math.log(math.exp(0.5) + math.exp(1.5)), math.log(math.exp(-1.0) + math.exp(2.0)), 0.25], dtype=torch.float64
    )
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    w1t = torch.tensor(w1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, w1t * o1 + (1 - w1t) * o2, rtol=1e-12, atol=1e-12)
    # d out / d l1 = w1 (1 - w1) (o1 - o2) ; d lse / d l1 = w1 (and symmetrically for l2, with w2 = 1 - w1)
    g_l1, g_l2 = torch.autograd.grad(out.sum() + lse.sum(), (l1, l2))
    expected = (w1t * (1 - w1t) * (o1 - o2)).sum(1) + w1t[:, 0]
    torch.testing.assert_close(g_l1, expected.detach(), rtol=1e-12, atol=1e-12)
    expected = (w1t * (1 - w1t) * (o2 - o1)).sum(1) + (1 - w1t[:, 0])
    torch.testing.assert_close(g_l2, expected.detach(), rtol=1e-12, atol=1e-12)


def test_merge_all_sets_empty():
    o = torch.zeros(2, 3, dtype=torch.float64)
    lse_set = torch.full((2,), float("-inf"), dtype=torch.float64)
    out, lse = ops.merge_attentions([o, o.clone()], [lse_set, lse_set.clone()])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_all_sets_empty_has_finite_gradients():
    """Positions where every set is empty (lse -inf) merge to output 0, lse -inf, with zero gradients; positions
    with keys keep the exact merge gradients."""
    o1, o2 = rand64(3, 4, seed=33, grad=True), rand64(3, 4, seed=34, grad=True)
    l1 = torch.tensor([float("-inf"), 0.5, float("-inf")], dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor([float("-inf"), -1.0, 0.25], dtype=torch.float64, requires_grad=True)
    out, lse = ops.merge_attentions([o1, o2], [l1, l2])
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0])
    grads = torch.autograd.grad(out.sum() + lse[1:].sum(), (o1, o2, l1, l2))
    for name, grad in zip(["outputs[0]", "outputs[1]", "lses[0]", "lses[1]"], grads):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
        assert torch.all(grad[0] == 0), f"non-zero gradient for {name} at the all-empty position"


def test_merge_of_neighborhood_and_extra_tokens_equals_additional_keys():
    """NA over a window merged with attention over extra tokens equals NA with additional_keys (one softmax)."""
    q, k, v = (rand64(1, 6, 5, 2, 4, seed=s) for s in (28, 29, 30))
    ak, av = rand64(1, 3, 2, 4, seed=31), rand64(1, 3, 2, 4, seed=32)
    o1, l1 = ops.na2d(q, k, v, 3, return_lse=True, backend="reference")
    o2, l2 = ops.attention(q, ak, av, return_lse=True)
    out, lse = ops.merge_attentions([o1, o2], [l1, l2])
    ref, ref_lse = ops.na2d(q, k, v, 3, additional_keys=ak, additional_values=av, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)


def test_merge_rejects_mismatched_inputs():
    o, lse_set = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="lses"):
        ops.merge_attentions([o, o], [lse_set])
    with pytest.raises(ValueError):
        ops.merge_attentions([], [])
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        ops.merge_attentions([o, torch.zeros(3, 3)], [lse_set, torch.zeros(3)])
    with pytest.raises(ValueError, match=r"lses\[0\]"):
        ops.merge_attentions([o], [torch.zeros(3)])
