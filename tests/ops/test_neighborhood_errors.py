"""Bad input to ``neighborhood_attention``: a ValueError/TypeError naming the argument and its value, raised before
any backend runs; plus hypothesis fuzzing: every call either matches the reference or raises such an error."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS

ARG_NAMES = (
    "q",
    "k",
    "v",
    "kernel_size",
    "stride",
    "dilation",
    "is_causal",
    "scale",
    "backend",
    "additional_keys",
    "additional_values",
    "rel_pos_bias",
    "key_bias",
)
NAMES_RE = re.compile(r"\b(" + "|".join(ARG_NAMES) + r")\b")


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Fail if any backend is consulted or run: validation must come before any heavy work."""
    calls = []
    for name, backend in BACKENDS.items():
        monkeypatch.setattr(backend, "run", lambda *a, _n=name, **kw: calls.append(("run", _n)))
        monkeypatch.setattr(
            backend, "not_supported_reasons", lambda *a, _n=name, **kw: calls.append(("reasons", _n)) or []
        )
    yield calls
    assert calls == [], f"a backend was reached before the input was rejected: {calls}"


def qkv(shape=(1, 7, 6, 2, 4), dv=None, dtype=torch.float32):
    q = torch.randn(shape, dtype=dtype)
    v = torch.randn(*shape[:-1], dv or shape[-1], dtype=dtype)
    return q, torch.randn(shape, dtype=dtype), v


def _call(args: dict):
    args = dict(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return ops.neighborhood_attention(q, k, v, **args)


def base(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, kernel_size=3)
    args.update(overrides)
    return args


Q, K, V = qkv()
BAD = [
    # (id, call args, exception, fragments the message must contain)
    (
        "rank_too_low",
        base(q=torch.randn(1, 2, 4), k=torch.randn(1, 2, 4), v=torch.randn(1, 2, 4)),
        ValueError,
        ["q.shape=(1, 2, 4)"],
    ),
    (
        "rank_too_high",
        base(
            q=torch.randn(1, 2, 2, 2, 2, 1, 4), k=torch.randn(1, 2, 2, 2, 2, 1, 4), v=torch.randn(1, 2, 2, 2, 2, 1, 4)
        ),
        ValueError,
        ["q.shape=(1, 2, 2, 2, 2, 1, 4)"],
    ),
    ("q_not_tensor", base(q=[[1.0]]), TypeError, ["q", "list"]),
    ("k_shape", base(k=torch.randn(1, 7, 5, 2, 4)), ValueError, ["k.shape=(1, 7, 5, 2, 4)"]),
    ("k_head_dim", base(k=torch.randn(1, 7, 6, 2, 8)), ValueError, ["k.shape=(1, 7, 6, 2, 8)"]),
    ("k_rank", base(k=torch.randn(1, 7, 2, 4)), ValueError, ["k.shape=(1, 7, 2, 4)"]),
    ("v_shape", base(v=torch.randn(1, 7, 6, 3, 4)), ValueError, ["v.shape=(1, 7, 6, 3, 4)"]),
    ("k_dtype", base(k=K.double()), TypeError, ["k.dtype=torch.float64"]),
    ("v_dtype", base(v=V.half()), TypeError, ["v.dtype=torch.float16"]),
    ("k_device", base(k=torch.empty(1, 7, 6, 2, 4, device="meta")), ValueError, ["k.device=meta"]),
    ("non_float", base(q=Q.long(), k=K.long(), v=V.long()), TypeError, ["q.dtype=torch.int64"]),
    (
        "empty_batch",
        base(q=torch.randn(0, 7, 6, 2, 4), k=torch.randn(0, 7, 6, 2, 4), v=torch.randn(0, 7, 6, 2, 4)),
        ValueError,
        ["q.shape=(0, 7, 6, 2, 4)"],
    ),
    ("kernel_1", base(kernel_size=1), ValueError, ["kernel_size=1", ">= 2"]),
    ("kernel_tuple_1", base(kernel_size=(3, 1)), ValueError, ["kernel_size=(3, 1)", "axis 1"]),
    ("kernel_negative", base(kernel_size=-3), ValueError, ["kernel_size=-3"]),
    ("kernel_gt_extent", base(kernel_size=(3, 7)), ValueError, ["kernel_size=7", "extent", "axis 1", "got 6"]),
    (
        "kernel_dilation_gt_extent",
        base(kernel_size=3, dilation=(3, 2)),
        ValueError,
        ["kernel_size=3", "dilation=3", ">= 9", "axis 0", "got 7"],
    ),
    ("dilation_0", base(dilation=0), ValueError, ["dilation=0"]),
    ("stride_0", base(stride=0), ValueError, ["stride=0"]),
    ("stride_gt_kernel", base(stride=(1, 4)), ValueError, ["stride=4", "kernel_size=3", "axis 1"]),
    ("kernel_len", base(kernel_size=(3, 3, 3)), ValueError, ["kernel_size=(3, 3, 3)", "3 entries", "2 spatial axes"]),
    ("stride_len", base(stride=(1,)), ValueError, ["stride=(1,)", "1 entries"]),
    ("dilation_len", base(dilation=[1, 1, 1]), ValueError, ["dilation=[1, 1, 1]"]),
    ("causal_len", base(is_causal=(True,)), ValueError, ["is_causal=(True,)"]),
    ("kernel_float", base(kernel_size=3.0), TypeError, ["kernel_size=3.0"]),
    ("kernel_float_entry", base(kernel_size=(3, 3.0)), TypeError, ["kernel_size=(3, 3.0)"]),
    ("kernel_bool", base(kernel_size=True), TypeError, ["kernel_size=True"]),
    ("kernel_str", base(kernel_size="3"), TypeError, ["kernel_size='3'"]),
    ("kernel_none", base(kernel_size=None), TypeError, ["kernel_size=None"]),
    ("stride_tensor_entry", base(stride=(1, "2")), TypeError, ["stride=(1, '2')"]),
    ("causal_int", base(is_causal=1), TypeError, ["is_causal=1"]),
    ("causal_int_entry", base(is_causal=(True, 0)), TypeError, ["is_causal=(True, 0)"]),
    ("scale_str", base(scale="0.5"), TypeError, ["scale='0.5'"]),
    ("scale_bool", base(scale=True), TypeError, ["scale=True"]),
    ("backend_unknown", base(backend="cuda"), ValueError, ["backend='cuda'", "reference"]),
    ("backend_not_str", base(backend=3), TypeError, ["backend=3"]),
    (
        "add_keys_alone",
        base(additional_keys=torch.randn(1, 3, 2, 4)),
        ValueError,
        ["additional_keys", "additional_values"],
    ),
    (
        "add_values_alone",
        base(additional_values=torch.randn(1, 3, 2, 4)),
        ValueError,
        ["additional_keys", "additional_values"],
    ),
    (
        "add_keys_head_dim",
        base(additional_keys=torch.randn(1, 3, 2, 5), additional_values=torch.randn(1, 3, 2, 4)),
        ValueError,
        ["additional_keys.shape=(1, 3, 2, 5)"],
    ),
    (
        "add_keys_batch",
        base(additional_keys=torch.randn(2, 3, 2, 4), additional_values=torch.randn(2, 3, 2, 4)),
        ValueError,
        ["additional_keys.shape=(2, 3, 2, 4)"],
    ),
    (
        "add_keys_rank",
        base(additional_keys=torch.randn(1, 3, 8), additional_values=torch.randn(1, 3, 8)),
        ValueError,
        ["additional_keys.shape=(1, 3, 8)"],
    ),
    (
        "add_values_count",
        base(additional_keys=torch.randn(1, 3, 2, 4), additional_values=torch.randn(1, 4, 2, 4)),
        ValueError,
        ["additional_values.shape=(1, 4, 2, 4)"],
    ),
    (
        "add_values_dtype",
        base(additional_keys=torch.randn(1, 3, 2, 4), additional_values=torch.randn(1, 3, 2, 4).double()),
        TypeError,
        ["additional_values", "float64"],
    ),
    (
        "add_keys_not_tensor",
        base(additional_keys=[1.0], additional_values=torch.randn(1, 3, 2, 4)),
        TypeError,
        ["additional_keys"],
    ),
    ("rpb_shape", base(rel_pos_bias=torch.randn(2, 5, 4)), ValueError, ["rel_pos_bias.shape=(2, 5, 4)", "(2, 5, 5)"]),
    ("rpb_heads", base(rel_pos_bias=torch.randn(3, 5, 5)), ValueError, ["rel_pos_bias.shape=(3, 5, 5)"]),
    ("rpb_dtype", base(rel_pos_bias=torch.randn(2, 5, 5).double()), TypeError, ["rel_pos_bias", "float64"]),
    ("rpb_not_tensor", base(rel_pos_bias=0.5), ValueError, ["rel_pos_bias.shape=float"]),
    ("key_bias_shape", base(key_bias=torch.randn(1, 7, 5, 2)), ValueError, ["key_bias.shape=(1, 7, 5, 2)"]),
    ("key_bias_rank", base(key_bias=torch.randn(1, 1, 7, 6, 2)), ValueError, ["key_bias.shape=(1, 1, 7, 6, 2)"]),
    ("key_bias_bool", base(key_bias=torch.ones(1, 7, 6, 2, dtype=torch.bool)), TypeError, ["key_bias"]),
    ("key_bias_device", base(key_bias=torch.empty(1, 7, 6, 2, device="meta")), ValueError, ["key_bias.device=meta"]),
    ("na1d_rank", dict(fn="na1d", q=Q, k=K, v=V, kernel_size=3), ValueError, ["na1d", "(1, 7, 6, 2, 4)"]),
    ("na3d_rank", dict(fn="na3d", q=Q, k=K, v=V, kernel_size=3), ValueError, ["na3d", "(1, 7, 6, 2, 4)"]),
]


@pytest.mark.parametrize("args,exc,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_a_clear_message(args, exc, fragments, no_backend_runs):
    args = dict(args)
    fn = args.pop("fn", None)
    with pytest.raises(exc) as info:
        if fn is None:
            _call(args)
        else:
            getattr(ops, fn)(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert NAMES_RE.search(message) or fn is not None, f"message names no argument: {message!r}"


def test_explicit_backend_that_cannot_run_lists_every_reason():
    q, k, v = qkv()
    with pytest.raises(ValueError) as info:
        ops.na2d(q, k, v, kernel_size=3, stride=(2, 3), backend="partition")
    message = str(info.value)
    assert "backend='partition'" in message
    assert "stride=2, kernel_size=3 along axis 0" in message
    assert "got 7 along axis 0" in message  # 7 is not divisible by 3
    assert "axis 1" not in message  # axis 1 (stride 3 = kernel 3, extent 6) is fine: exactly two reasons
    assert message.count(";") == 1


def test_valid_edge_cases_are_accepted():
    """Guards against over-eager validation: legal corner cases run and match the reference."""
    q, k, v = qkv((1, 7, 6, 2, 4))
    cases = [
        dict(kernel_size=(7, 6)),  # kernel = extent
        dict(kernel_size=(2, 3), dilation=(3, 2)),  # kernel·dilation = extent
        dict(kernel_size=[3, 2], stride=[3, 2], is_causal=[True, False]),  # lists
        dict(kernel_size=2, stride=2, scale=0),  # int scale
        dict(kernel_size=3, key_bias=torch.zeros(6, 1)),  # key bias broadcast from a trailing shape
    ]
    for kw in cases:
        out = ops.na2d(q, k, v, **kw)
        ref = ops.na2d(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# mechanisms' Padding (window padding for neighborhood_attention): wrong spatial axes are an error, not a silent pad


@pytest.mark.parametrize("trailing", [(), (8,), (2, 8)], ids=["none", "channels", "heads_dim"])
def test_padding_pads_and_crops_only_the_spatial_axes(trailing):
    from attnzoo.mechanisms._windows import Padding

    padding = Padding((4, 3), (1, 0), (1, 2))
    x = torch.randn(2, 4, 3, *trailing)
    padded = padding.pad(x)
    assert padded.shape == (2, 6, 5, *trailing)
    assert torch.equal(padded[:, 1:5, 0:3], x) and padded.count_nonzero() == x.count_nonzero()  # zeros elsewhere
    assert torch.equal(padding.crop(padded), x)


def test_padding_rejects_tensors_whose_spatial_axes_do_not_match():
    from attnzoo.mechanisms._windows import Padding

    padding = Padding((4, 4), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=re.escape("spatial_shape=(4, 4), got x.shape=(1, 4, 2, 8)")):
        padding.pad(torch.zeros(1, 4, 2, 8))  # (B, N, heads, d): not (B, 4, 4, ...)
    with pytest.raises(ValueError, match=re.escape("spatial_shape=(4, 4), got x.shape=(4, 4, 8)")):
        padding.pad(torch.zeros(4, 4, 8))  # no batch dim
    with pytest.raises(ValueError, match=re.escape("padded_shape=(6, 6), got x.shape=(1, 4, 4, 2, 8)")):
        padding.crop(torch.zeros(1, 4, 4, 2, 8))  # not padded
    with pytest.raises(ValueError, match="spatial_shape"):
        Padding((4, 4), (0, 0), (0, 0)).pad(torch.zeros(1, 5, 4, 8))  # checked even when nothing is padded


# ----------------------------------------------------------------------------------------------------------------
# fuzzing


JUNK_SCALARS = st.one_of(st.integers(-1, 9), st.booleans(), st.floats(1, 3), st.none(), st.just("2"))


@st.composite
def junk_axis_arg(draw, rank):
    """Something that may be wrong: any scalar, or a tuple/list of the wrong length or with wrong entries."""
    if draw(st.booleans()):
        return draw(JUNK_SCALARS)
    length = draw(st.sampled_from([rank - 1, rank, rank + 1]))
    values = draw(st.lists(JUNK_SCALARS, min_size=max(length, 0), max_size=max(length, 0)))
    return tuple(values) if draw(st.booleans()) else list(values)


def _pack(draw, values):
    """Per-axis values as an int/bool when all equal (sometimes), else a tuple or list."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return tuple(values) if draw(st.booleans()) else list(values)


@st.composite
def calls(draw):
    """Mostly-legal calls with a few things (possibly) broken, so both outcomes are exercised; ``legal`` is True
    when nothing was broken (and no backend that may decline the geometry was asked for): such a call must run."""
    rank = draw(st.integers(1, 3))
    extent = st.sampled_from([2, 3, 4, 5, 6] * 5 + [1])  # extent 1 admits no legal kernel (kernel_size >= 2)
    spatial = tuple(draw(st.lists(extent, min_size=rank, max_size=rank)))
    legal = min(spatial) >= 2
    batch, heads, d = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    dv = draw(st.sampled_from([d, d, 3]))
    shape = (batch, *spatial, heads, d)
    k_shape = shape
    if draw(st.integers(0, 11)) == 0:  # occasionally a mismatched k
        k_shape = (batch, *spatial[:-1], spatial[-1] + 1, heads, d)
        legal = False
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    q = torch.randn(shape, dtype=dtype)
    k = torch.randn(k_shape, dtype=dtype)
    v = torch.randn(*shape[:-1], dv, dtype=dtype)
    if draw(st.integers(0, 11)) == 0:  # occasionally the wrong rank for the wrapper
        q = q.flatten(1, 2) if rank > 1 else q[:, :, None]
        legal = False
    # a legal geometry per axis (where the extent allows one: kernel >= 2 needs an extent >= 2) ...
    kernel = [draw(st.integers(2, max(2, n))) for n in spatial]
    dilation = [draw(st.integers(1, max(1, n // kk))) for n, kk in zip(spatial, kernel)]
    stride = [draw(st.integers(1, kk)) for kk in kernel]
    causal = [draw(st.booleans()) for _ in spatial]
    geometry = {
        "kernel_size": _pack(draw, kernel),
        "stride": _pack(draw, stride),
        "dilation": _pack(draw, dilation),
        "is_causal": _pack(draw, causal),
    }
    # ... then each argument broken with probability 1/10
    for name in geometry:
        if draw(st.integers(0, 9)) == 0:
            geometry[name] = draw(junk_axis_arg(rank))
            legal = False  # (junk may happen to be legal: then the call may run or not)
    args = dict(
        q=q,
        k=k,
        v=v,
        **geometry,
        return_lse=draw(st.booleans()),
        backend=draw(st.sampled_from(["auto"] * 3 + ["native", "tiled", "partition", "reference"] * 2 + ["bogus"])),
    )
    legal = legal and args["backend"] not in ("partition", "bogus")
    if draw(st.integers(0, 3)) == 0:
        n = draw(st.integers(1, 3))
        dk = draw(st.sampled_from([d, d, d, d + 1]))
        legal = legal and dk == d
        args["additional_keys"] = torch.randn(batch, n, heads, dk, dtype=dtype)
        args["additional_values"] = torch.randn(batch, n, heads, dv, dtype=dtype)
    if draw(st.integers(0, 3)) == 0:
        sizes = [2 * kk - 1 for kk in kernel]
        if draw(st.integers(0, 2)) == 0:
            sizes[draw(st.integers(0, rank - 1))] += 1
            legal = False
        args["rel_pos_bias"] = torch.randn(heads, *sizes, dtype=dtype)
    if draw(st.integers(0, 3)) == 0:
        bad_kb = (spatial[-1] + 1, 1)
        kb_shape = draw(st.sampled_from([(batch, *spatial, heads), (1, *spatial, 1), (heads,), bad_kb]))
        legal = legal and kb_shape != bad_kb
        args["key_bias"] = torch.randn(kb_shape, dtype=dtype)
    fn = draw(st.sampled_from(["neighborhood_attention", f"na{rank}d"]))
    return fn, args, legal


@given(calls())
def test_fuzz_valid_output_or_named_error(call):
    fn, args, legal = call
    args = dict(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    try:
        res = getattr(ops, fn)(q, k, v, **args)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert not legal, f"a legal call was rejected: {message!r}"
        assert NAMES_RE.search(message) or re.search(r"\bna[123]d\b", message), f"unnamed argument in {message!r}"
        event(f"rejected: {type(exc).__name__}")
        return
    event("ran")
    ref_args = dict(args, backend="reference")
    ref = ops.neighborhood_attention(q, k, v, **ref_args)
    out, ref_out = (res[0], ref[0]) if args["return_lse"] else (res, ref)
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    if args["return_lse"]:
        torch.testing.assert_close(res[1], ref[1], rtol=1e-5, atol=1e-5)
