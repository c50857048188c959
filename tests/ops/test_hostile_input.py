"""Hostile input to the engine (issue 18, items 1, 2, 3, 6, 15, 16): NaN/Inf propagate as in the reference on every
backend, every tensor argument is checked for device and dtype, types are checked rather than coerced, double
backward works through the native op, the registered op checks its own inputs, and recording is context-local."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS

NAN, INF = float("nan"), float("inf")
CPU_BACKENDS = [name for name in ("native", "tiled", "reference") if name in BACKENDS]


def _qkv(shape=(2, 9, 7, 2, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))


def _poison(q, k, v, where: str):
    """Put a NaN or Inf into one input entry; returns the extra call arguments (scale, biases)."""
    extra = {}
    if where == "q_nan":
        q[0, 4, 3, 1, 0] = NAN
    elif where == "k_nan":
        k[1, 2, 5, 0, 3] = NAN
    elif where == "q_inf":
        q[0, 4, 3, 1, 2] = INF
    elif where == "k_neg_inf":
        k[0, 6, 1, 1, 1] = -INF
    elif where == "k_inf_q_zero":  # 0 * inf = NaN in the logit
        k[0, 3, 3, 0, 0] = INF
        q[0, 3, 3, 0, 0] = 0.0
    elif where == "scale_nan":
        extra["scale"] = NAN
    elif where == "scale_inf":
        extra["scale"] = INF
    elif where == "rel_pos_bias_nan":
        rpb = torch.zeros(2, 9, 9)
        rpb[1, 4, 5] = NAN
        extra["rel_pos_bias"] = rpb
    elif where == "key_bias_nan":
        kb = torch.zeros(2, 9, 7, 2)
        kb[1, 4, 4, 1] = NAN
        extra["key_bias"] = kb
    elif where == "additional_key_nan":
        ak, av = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
        ak[0, 1, 0, 2] = NAN
        extra.update(additional_keys=ak, additional_values=av)
    return extra


POISON = [
    "q_nan",
    "k_nan",
    "q_inf",
    "k_neg_inf",
    "k_inf_q_zero",
    "scale_nan",
    "scale_inf",
    "rel_pos_bias_nan",
    "key_bias_nan",
    "additional_key_nan",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("where", POISON)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_propagate_as_in_the_reference(backend, where, dtype):
    q, k, v = _qkv(dtype=dtype)
    extra = _poison(q, k, v, where)
    if dtype != torch.float32:
        extra = {n: t.to(dtype) if isinstance(t, torch.Tensor) and n != "key_bias" else t for n, t in extra.items()}
    expected, expected_lse = ops.na2d(q, k, v, 5, backend="reference", return_lse=True, **extra)
    out, lse = ops.na2d(q, k, v, 5, backend=backend, return_lse=True, **extra)
    assert torch.equal(out.isnan(), expected.isnan()), f"NaN pattern differs from the reference ({where})"
    assert torch.equal(lse.isnan(), expected_lse.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out[finite], expected[finite], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_value_reaches_exactly_the_queries_that_see_it(backend):
    q, k, v = _qkv(shape=(1, 12, 1, 4))
    v[0, 7, 0, 2] = NAN
    out = ops.na1d(q, k, v, 3, backend=backend)
    sees = ops.neighborhood_mask((12,), 3)[:, 7]
    assert out[0, sees, 0, 2].isnan().all()
    if backend == "native":  # the dense reference and tiled also spread it to other queries (0 · NaN in P·V)
        assert torch.equal(out[0, :, 0, 2].isnan(), sees)


def test_native_nan_in_query_is_not_zero():
    """The exact case of the report: NaN in q gave output 0 on the native backend."""
    q, k, v = _qkv(shape=(1, 8, 1, 4))
    q[0, 3, 0, 0] = NAN
    assert ops.na1d(q, k, v, 3)[0, 3, 0].isnan().all()


def test_nan_gradients_propagate_on_native():
    q, k, v = (t.double().requires_grad_() for t in _qkv(shape=(1, 10, 1, 4), dtype=torch.float64))
    grads = {}
    for backend in ("native", "reference"):
        out = ops.na1d(q, k, v, 3, backend=backend)
        upstream = torch.ones_like(out)
        upstream[0, 5, 0, 1] = NAN
        grads[backend] = torch.autograd.grad(out, (q, k, v), upstream)
    assert torch.equal(grads["native"][0].isnan(), grads["reference"][0].isnan())
    window = ops.neighborhood_mask((10,), 3)[5]  # the keys query 5 sees must get NaN gradients
    for got in grads["native"][1:]:
        assert got[0, window].isnan().any(-1).all()


META = torch.device("meta")


def _attn_args():
    q, k, v = _qkv(shape=(1, 6, 2, 4))
    return q, k, v


ATTENTION_BAD = [
    (
        "attn_mask_meta",
        dict(attn_mask=torch.ones(6, 6, dtype=torch.bool, device=META)),
        ValueError,
        "attn_mask.device=meta",
    ),
    ("attn_mask_float_meta", dict(attn_mask=torch.zeros(6, 6, device=META)), ValueError, "attn_mask.device=meta"),
    ("k_meta", dict(k=torch.empty(1, 6, 2, 4, device=META)), ValueError, "k.device=meta"),
    ("v_meta", dict(v=torch.empty(1, 6, 2, 4, device=META)), ValueError, "v.device=meta"),
    ("is_causal_str", dict(is_causal="yes"), TypeError, "is_causal='yes'"),
    ("is_causal_int", dict(is_causal=1), TypeError, "is_causal=1"),
    ("return_lse_str", dict(return_lse="yes"), TypeError, "return_lse='yes'"),
    ("scale_str", dict(scale="0.5"), TypeError, "scale='0.5'"),
    ("scale_tensor", dict(scale=torch.tensor(0.5)), TypeError, "scale="),
]


@pytest.mark.parametrize("case", ATTENTION_BAD, ids=[c[0] for c in ATTENTION_BAD])
def test_attention_checks_every_argument(case):
    _, overrides, exc, fragment = case
    q, k, v = _attn_args()
    args = dict(k=k, v=v)
    args.update(overrides)
    k, v = args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=re.escape(fragment)):
        ops.attention(q, k, v, **args)


NA_BAD = [
    ("return_lse_str", dict(return_lse="yes"), TypeError, "return_lse='yes'"),
    ("is_causal_str", dict(is_causal="yes"), TypeError, "is_causal='yes'"),
    ("kernel_float_tuple", dict(kernel_size=(5.7, 3)), TypeError, "kernel_size=(5.7, 3)"),
    ("kernel_str", dict(kernel_size="55"), TypeError, "kernel_size='55'"),
    ("rel_pos_bias_meta", dict(rel_pos_bias=torch.zeros(2, 9, 9, device=META)), TypeError, "rel_pos_bias"),
    ("key_bias_meta", dict(key_bias=torch.zeros(2, 9, 7, 2, device=META)), ValueError, "key_bias.device=meta"),
    ("key_bias_int", dict(key_bias=torch.zeros(2, 9, 7, 2, dtype=torch.int64)), TypeError, "key_bias"),
    (
        "key_bias_half_into_float32",
        dict(key_bias=torch.zeros(2, 9, 7, 2, dtype=torch.float16)),
        TypeError,
        "key_bias.dtype",
    ),
    (
        "additional_keys_meta",
        dict(additional_keys=torch.zeros(2, 3, 2, 4, device=META), additional_values=torch.zeros(2, 3, 2, 4)),
        TypeError,
        "additional_keys",
    ),
]


@pytest.mark.parametrize("case", NA_BAD, ids=[c[0] for c in NA_BAD])
def test_neighborhood_attention_checks_every_argument(case):
    _, overrides, exc, fragment = case
    q, k, v = _qkv()
    args = dict(kernel_size=5)
    args.update(overrides)
    with pytest.raises(exc, match=re.escape(fragment)):
        ops.neighborhood_attention(q, k, v, **args)


GEOMETRY_BAD = [
    ("shape_str", ("55", 3), TypeError, "spatial_shape='55'"),
    ("shape_float", ((5.7,), 3), TypeError, r"spatial_shape=\(5.7,\)"),
    ("shape_bool", ((True, 5), 1), TypeError, "spatial_shape"),
    ("shape_zero", ((0, 5), 1), ValueError, "spatial_shape"),
    ("kernel_float", ((5,), 3.0), TypeError, "kernel_size=3.0"),
    ("causal_str", ((5,), 3, 1, 1, "yes"), TypeError, "is_causal='yes'"),
]


@pytest.mark.parametrize("case", GEOMETRY_BAD, ids=[c[0] for c in GEOMETRY_BAD])
def test_neighborhood_mask_checks_types(case):
    _, args, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        ops.neighborhood_mask(*args)
    with pytest.raises(exc, match=fragment):
        ops.neighborhood_rel_index(*args)


def _outs():
    q, k, v = _qkv(shape=(3, 6, 2, 4))
    out1, lse1 = ops.attention(q[:, :3], k[:, :3], v[:, :3], return_lse=True)
    out2, lse2 = ops.attention(q[:, :3], k[:, 3:], v[:, 3:], return_lse=True)
    return out1, lse1, out2, lse2


MERGE_BAD = [
    (
        "tensors_not_lists",
        lambda o1, l1, o2, l2: (torch.stack([o1, o2]), torch.stack([l1, l2])),
        TypeError,
        "outputs must be a list",
    ),
    ("tensor_outputs", lambda o1, l1, o2, l2: (o1, [l1]), TypeError, "outputs must be a list"),
    ("generator", lambda o1, l1, o2, l2: ((o for o in (o1, o2)), [l1, l2]), TypeError, "outputs must be a list"),
    ("non_tensor_item", lambda o1, l1, o2, l2: ([o1, 3.0], [l1, l2]), TypeError, r"outputs\[1\]"),
    ("int_lse", lambda o1, l1, o2, l2: ([o1, o2], [l1, l2.long()]), TypeError, r"lses\[1\]"),
    ("meta_lse", lambda o1, l1, o2, l2: ([o1, o2], [l1, torch.empty_like(l2, device=META)]), ValueError, r"lses\[1\]"),
    ("dtype_mix", lambda o1, l1, o2, l2: ([o1, o2.double()], [l1, l2]), TypeError, r"outputs\[1\]"),
]


@pytest.mark.parametrize("case", MERGE_BAD, ids=[c[0] for c in MERGE_BAD])
def test_merge_attentions_checks_types(case):
    _, build, exc, fragment = case
    outputs, lses = build(*_outs())
    with pytest.raises(exc, match=fragment):
        ops.merge_attentions(outputs, lses)


def test_merge_attentions_still_merges_lists_and_tuples():
    o1, l1, o2, l2 = _outs()
    q, k, v = _qkv(shape=(3, 6, 2, 4))
    full = ops.attention(q[:, :3], k, v)
    for outputs, lses in (([o1, o2], [l1, l2]), ((o1, o2), (l1, l2))):
        torch.testing.assert_close(ops.merge_attentions(outputs, lses)[0], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_tokens", [-5, 0, 2.5, "100", True])
def test_record_attention_max_tokens_is_checked(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"), ops.record_attention(max_tokens=max_tokens):
        pass


# ---- item 6: double backward through the native op -------------------------------------------------------------


def test_double_backward_through_native_matches_tiled():
    q, k, v = (t.double().requires_grad_() for t in _qkv(shape=(1, 7, 6, 2, 4)))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty(backend):
        out = ops.na2d(q, k, v, 3, backend=backend, rel_pos_bias=rpb)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(gq.square().sum(), (q, k, v, rpb))

    for got, want in zip(penalty("native"), penalty("tiled")):
        torch.testing.assert_close(got, want)


def test_gradgradcheck_native():
    q, k, v = (t.double().requires_grad_() for t in _qkv(shape=(1, 6, 1, 3)))
    kb = torch.zeros(1, 6, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v, kb: ops.na1d(q, k, v, 3, backend="native", key_bias=kb), (q, k, v, kb)
    )


# ---- item 15: the registered op checks its own inputs --------------------------------------------------------


def _raw_args(**overrides):
    q, k, v = _qkv(shape=(1, 8, 1, 4))
    args = dict(
        q=q,
        k=k,
        v=v,
        additional_keys=None,
        additional_values=None,
        rel_pos_bias=None,
        key_bias=None,
        kernel_size=[3],
        stride=[1],
        dilation=[1],
        is_causal=[False],
        scale=0.5,
    )
    args.update(overrides)
    return list(args.values())


RAW_BAD = [
    ("k_longer", dict(k=torch.randn(1, 9, 1, 4)), "k.shape"),
    ("v_fewer_tokens", dict(v=torch.randn(1, 2, 1, 4)), "v.shape"),
    ("kernel_too_large", dict(kernel_size=[9]), "kernel_size"),
    ("kernel_rank", dict(kernel_size=[3, 3]), "kernel_size"),
    ("stride_zero", dict(stride=[0]), "stride"),
    ("non_contiguous", dict(q=torch.randn(1, 8, 1, 8)[..., ::2]), "contiguous"),
    ("half", dict(q=torch.randn(1, 8, 1, 4).half()), "q.dtype"),
    ("dtype_mix", dict(k=torch.randn(1, 8, 1, 4).double()), "k.dtype"),
    ("rel_pos_bias_small", dict(rel_pos_bias=torch.zeros(1, 2)), "rel_pos_bias"),
    ("key_bias_small", dict(key_bias=torch.zeros(1, 3, 1)), "key_bias"),
    (
        "additional_mismatch",
        dict(additional_keys=torch.randn(1, 2, 1, 4), additional_values=torch.randn(1, 3, 1, 4)),
        "additional_values",
    ),
    ("rank_too_high", dict(q=torch.randn(1, 2, 2, 2, 2, 1, 4)), "q.shape"),
]


@pytest.mark.parametrize("case", RAW_BAD, ids=[c[0] for c in RAW_BAD])
def test_registered_forward_op_validates(case):
    _, overrides, fragment = case
    with pytest.raises((ValueError, TypeError), match=fragment):
        torch.ops.attnzoo.na_forward(*_raw_args(**overrides))


def test_registered_backward_op_validates():
    q, k, v, *rest = _raw_args()
    out, lse = torch.ops.attnzoo.na_forward(q, k, v, *rest)
    geometry = rest[4:]
    with pytest.raises(ValueError, match="grad_out.shape"):
        torch.ops.attnzoo.na_backward(
            torch.randn(1, 3, 1, 4), None, q, k, v, None, None, None, None, out, lse, *geometry
        )
    with pytest.raises(ValueError, match="lse.shape"):
        torch.ops.attnzoo.na_backward(
            torch.randn_like(out), None, q, k, v, None, None, None, None, out, lse[:, :2], *geometry
        )
    grads = torch.ops.attnzoo.na_backward(
        torch.randn_like(out), None, q, k, v, None, None, None, None, out, lse, *geometry
    )
    assert grads[0].shape == q.shape


# ---- item 16: recording is context-local ---------------------------------------------------------------------


def test_record_attention_ignores_other_threads():
    q, k, v = _qkv(shape=(1, 40, 40, 1, 4))  # 1600 tokens: above the recording thread's max_tokens
    errors, done = [], threading.Event()

    def other():
        try:
            for _ in range(5):
                ops.na2d(q, k, v, 3)
                ops.attention(q[:, :4, :4], k[:, :4, :4], v[:, :4, :4])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)
        done.set()

    small = _qkv(shape=(1, 6, 6, 1, 4))
    with ops.record_attention(max_tokens=100) as records:
        thread = threading.Thread(target=other)
        thread.start()
        ops.na2d(*small, 3)
        done.wait(60)
        thread.join()
    assert errors == []
    assert len(records) == 1 and records[0].query_shape == (6, 6)


def test_record_attention_is_task_local():
    small = _qkv(shape=(1, 6, 6, 1, 4))

    async def recorder(n):
        with ops.record_attention() as records:
            for _ in range(n):
                ops.na2d(*small, 3)
                await asyncio.sleep(0)
        return len(records)

    async def both():
        return await asyncio.gather(recorder(2), recorder(3))

    assert asyncio.run(both()) == [2, 3]


@pytest.mark.parametrize("where", ["q_nan", "k_nan", "q_inf", "scale_nan"])
def test_partition_backend_propagates_nan_like_the_reference(where):
    q, k, v = _qkv(shape=(2, 9, 6, 2, 4))
    extra = {}
    if where == "q_nan":
        q[0, 4, 3, 1, 0] = NAN
    elif where == "k_nan":
        k[1, 2, 5, 0, 3] = NAN
    elif where == "q_inf":
        q[0, 4, 3, 1, 2] = INF
    else:
        extra["scale"] = NAN
    expected = ops.na2d(q, k, v, 3, stride=3, backend="reference", **extra)
    for backend in ("partition", "native", "tiled"):
        out = ops.na2d(q, k, v, 3, stride=3, backend=backend, **extra)
        assert torch.equal(out.isnan(), expected.isnan()), backend
        finite = expected.isfinite()
        torch.testing.assert_close(out[finite], expected[finite], atol=1e-5, rtol=1e-5)
