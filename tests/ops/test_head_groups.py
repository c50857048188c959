"""Per-head-group kernel_size and dilation in one ``neighborhood_attention`` call (``head_groups=``).

Every backend, float64, relative RMS 1e-10: the grouped call must equal (a) the reference backend on the same
grouped call, and (b) separate ``reference`` calls on the head slices concatenated by hand; forward, lse and the
gradients of every differentiable input. Plus the named errors of the new argument.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo.ops as ops

from conftest import rand64

BACKENDS = ops.list_backends()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


CASES = [
    # spatial, head_groups, kernel_size, dilation, stride, causal, with additional keys / rpb / key_bias
    dict(spatial=(13,), groups=(1, 2, 1), kernel=(3, 5, 3), dilation=(1, 2, 3), stride=1, causal=False),
    dict(spatial=(9, 10), groups=(2, 1, 1), kernel=(3, (3, 5), 3), dilation=(1, (2, 1), 3), stride=1, causal=False),
    dict(spatial=(8, 8), groups=(2, 2), kernel=(4, 4), dilation=(1, 2), stride=4, causal=False),  # partition-able
    dict(spatial=(9, 11), groups=(1, 1, 2), kernel=3, dilation=(1, 1, 2), stride=1, causal=(True, False)),
    dict(spatial=(5, 6, 7), groups=(1, 1), kernel=(3, 2), dilation=(1, (2, 1, 3)), stride=1, causal=False),
]


def inputs(case, extras: bool, seed: int = 0):
    heads = sum(case["groups"])
    shape = (2, *case["spatial"], heads)
    q, k = rand64(*shape, 4, seed=seed, grad=True), rand64(*shape, 4, seed=seed + 1, grad=True)
    v = rand64(*shape, 3, seed=seed + 2, grad=True)
    kw: dict = {}
    if extras:
        rank = len(case["spatial"])
        kernels = ops.problem.per_group_arg("kernel_size", case["kernel"], len(case["groups"]))
        kw["rel_pos_bias"] = [
            rand64(g, *(2 * kk - 1 for kk in ops.problem.normalize_axis_arg("k", kernel, rank)), seed=10 + i, grad=True)
            for i, (g, kernel) in enumerate(zip(case["groups"], kernels))
        ]
        kb = rand64(2, *case["spatial"], heads, seed=20).detach()
        kb[0, 0] = float("-inf")  # a dropped key
        kw["key_bias"] = kb.requires_grad_()
        kw["additional_keys"] = rand64(2, 2, heads, 4, seed=30, grad=True)
        kw["additional_values"] = rand64(2, 2, heads, 3, seed=31, grad=True)
    return (q, k, v), kw


def grads(out, lse, leaves):
    gen = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = (
        loss + (torch.where(torch.isfinite(lse), lse, 0) * torch.randn(lse.shape, generator=gen, dtype=lse.dtype)).sum()
    )
    return torch.autograd.grad(loss, leaves, allow_unused=False)


def leaves_of(qkv, kw):
    extra = [t for key in ("additional_keys", "additional_values", "key_bias") if key in kw for t in [kw[key]]]
    return [*qkv, *kw.get("rel_pos_bias", []), *extra]


def separate_calls(qkv, kw, case):
    """The oracle: one reference call per head group on its slices, concatenated by hand."""
    q, k, v = qkv
    groups = case["groups"]
    kernels = ops.problem.per_group_arg("kernel_size", case["kernel"], len(groups))
    dilations = ops.problem.per_group_arg("dilation", case["dilation"], len(groups))
    outs, lses, start = [], [], 0
    for i, (g, kk, dd) in enumerate(zip(groups, kernels, dilations)):
        sl = slice(start, start + g)
        extra = {}
        if kw:
            extra = dict(
                rel_pos_bias=kw["rel_pos_bias"][i],
                key_bias=kw["key_bias"][..., sl],
                additional_keys=kw["additional_keys"][:, :, sl],
                additional_values=kw["additional_values"][:, :, sl],
            )
        o, lse_group = ops.neighborhood_attention(
            q[..., sl, :],
            k[..., sl, :],
            v[..., sl, :],
            kk,
            case["stride"],
            dd,
            case["causal"],
            return_lse=True,
            backend="reference",
            **extra,
        )
        outs.append(o)
        lses.append(lse_group)
        start += g
    return torch.cat(outs, -2), torch.cat(lses, -1)


def supported(backend, case, qkv, kw) -> bool:
    try:
        ops.neighborhood_attention(
            *qkv,
            case["kernel"],
            case["stride"],
            case["dilation"],
            case["causal"],
            backend=backend,
            head_groups=case["groups"],
            **kw,
        )
    except ValueError as err:
        if "cannot run this problem" in str(err):
            return False
        raise
    return True


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['spatial']}-{c['groups']}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_call_equals_separate_reference_calls(backend, case, extras):
    qkv, kw = inputs(case, extras)
    if not supported(backend, case, qkv, kw):
        pytest.skip(f"{backend} does not run this geometry (it says why)")
    out, lse = ops.neighborhood_attention(
        *qkv,
        case["kernel"],
        case["stride"],
        case["dilation"],
        case["causal"],
        return_lse=True,
        backend=backend,
        head_groups=case["groups"],
        **kw,
    )
    ref_out, ref_lse = separate_calls(qkv, kw, case)
    assert rel_err(out, ref_out) < 1e-10
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], ref_lse[finite]) < 1e-10
    leaves = leaves_of(qkv, kw)
    for got, want in zip(grads(out, lse, leaves), grads(ref_out, ref_lse, leaves)):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_grouped_call_equals_reference_backend_on_the_grouped_call(backend):
    case = CASES[1]
    qkv, kw = inputs(case, extras=True, seed=3)
    if not supported(backend, case, qkv, kw):
        pytest.skip(f"{backend} does not run this geometry")
    args = (case["kernel"], case["stride"], case["dilation"], case["causal"])
    out = ops.neighborhood_attention(*qkv, *args, backend=backend, head_groups=case["groups"], **kw)
    ref = ops.neighborhood_attention(*qkv, *args, backend="reference", head_groups=case["groups"], **kw)
    assert rel_err(out, ref) < 1e-10


def test_one_group_and_equal_groups_are_the_plain_call():
    q, k, v = (rand64(1, 7, 8, 4, 4, seed=s) for s in range(3))
    plain = ops.neighborhood_attention(q, k, v, (3, 5), dilation=(2, 1), backend="reference")
    assert rel_err(ops.neighborhood_attention(q, k, v, [(3, 5)], dilation=[(2, 1)], head_groups=[4]), plain) < 1e-12
    assert (
        rel_err(ops.neighborhood_attention(q, k, v, [(3, 5)] * 2, head_groups=(1, 3), dilation=[(2, 1)] * 2), plain)
        < 1e-10
    )


def test_broadcast_key_bias_and_recording():
    q, k, v = (rand64(1, 6, 6, 3, 4, seed=s) for s in range(3))
    kb = torch.zeros(1, 6, 6, 1, dtype=torch.float64)
    kb[0, 2, 2] = float("-inf")
    with ops.record_attention() as records:
        ops.neighborhood_attention(q, k, v, (3, 5, 3), dilation=(1, 1, 2), key_bias=kb, head_groups=(1, 1, 1))
    (record,) = records
    assert record.weights.shape == (1, 3, 36, 36)
    assert (record.weights[:, :, :, 2 * 6 + 2] == 0).all()
    assert ((record.weights[0, 0] > 0).sum(-1) <= 9).all() and ((record.weights[0, 1] > 0).sum(-1) > 9).any()


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (dict(head_groups=(2, 1)), ValueError, "must sum to the number of heads 4"),
        (dict(head_groups=(2, 0, 2)), ValueError, "head_groups"),
        (dict(head_groups=2), TypeError, "head_groups=2"),
        (dict(head_groups=(2, 2), kernel_size=(3, 3, 3)), ValueError, "one entry per head group (2 groups)"),
        (dict(head_groups=(2, 2), kernel_size=(3, 9)), ValueError, "kernel_size=9"),
        (dict(head_groups=(2, 2), dilation=(1, 4)), ValueError, "dilation=4 needs an extent >= 12"),
        (dict(head_groups=(2, 2), dilation="x"), TypeError, "dilation='x'"),
        (dict(head_groups=(2, 2), rel_pos_bias=torch.zeros(4, 5, 5)), TypeError, "rel_pos_bias"),
        (dict(head_groups=(2, 2), rel_pos_bias=[torch.zeros(2, 3, 3)] * 2), ValueError, "rel_pos_bias[0].shape"),
        (dict(head_groups=(2, 2), key_bias=torch.zeros(1, 6, 7, 2)), ValueError, "key_bias.shape"),
        (dict(head_groups=(2, 2), backend="nope"), ValueError, "backend='nope'"),
    ],
)
def test_bad_head_groups_arguments_raise_named_errors(kwargs, exc, fragment):
    q, k, v = (rand64(1, 6, 7, 4, 4, seed=s) for s in range(3))
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(exc) as info:
        ops.neighborhood_attention(q, k, v, **kwargs)
    assert fragment in str(info.value)
