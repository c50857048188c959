"""Every neighborhood-attention backend against the dense masked oracle (``backend="reference"``).

Outputs, the returned logsumexp and the gradients of every differentiable input (q, k, v, additional keys/values,
rel_pos_bias, key_bias with -inf entries) must match the reference within a relative RMS error of 1e-5 (float32)
or 1e-10 (float64), over a sweep of 1/2/3-D geometries: odd and tiny extents, borders, even kernels, dilation
(also with extents not divisible by it), stride, mixed causal axes, several head dims (v's may differ), batch and
heads > 1. The reference itself is pinned by tests/ops/test_neighborhood_properties.py (hand softmax over a brute-force mask).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS, select_backend
from attnzoo.ops.problem import make_problem

from backend_sweep import CASES, Case, assert_close_rms, assert_lse_close, make_inputs, problem_of, run

FAST_BACKENDS = [b for b in ops.list_backends() if b != "reference"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


VARIANTS = ["plain", "lse", "extras", "extras_broadcast_bias"]


def skip_or_check_refusal(case: Case, backend: str, inputs: dict, grads: bool = True):
    """Skip where the backend declares it cannot run; then an explicit request must raise listing the reasons."""
    reasons = BACKENDS[backend].not_supported_reasons(problem_of(case, inputs, grads))
    if reasons:
        with pytest.raises(ValueError) as info:
            run(case, backend, inputs, grads=grads)
        for reason in reasons:
            assert reason in str(info.value)
        assert repr(backend) in str(info.value)
        pytest.skip(f"{backend} declines: {'; '.join(reasons)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case, backend, variant, dtype):
    inputs = make_inputs(case, variant, dtype)
    skip_or_check_refusal(case, backend, inputs)
    out, lse, grads = run(case, backend, inputs)
    ref_inputs = {"tensors": {n: x.double() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
    ref_out, ref_lse, ref_grads = run(case, "reference", ref_inputs)
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert_close_rms(out, ref_out, tol, "output")
    if lse is not None:
        assert lse.shape == out.shape[:-1]
        assert_lse_close(lse, ref_lse, tol, "lse")
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        if name == "key_bias":
            dropped = torch.isinf(inputs["tensors"]["key_bias"])
            assert torch.all(grad[dropped] == 0), "a dropped key (-inf bias) must get a zero gradient"
        assert_close_rms(grad, ref_grads[name], tol, f"grad {name}")


def test_reference_float32_matches_float64():
    """Sanity: the float64 reference agrees with its own float32 run (the oracle is not dtype-sensitive)."""
    case = CASES[9]
    inputs = make_inputs(case, "extras", torch.float32)
    out32, lse32, _ = run(case, "reference", inputs, grads=False)
    ref = {"tensors": {n: x.double() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
    out64, lse64, _ = run(case, "reference", ref, grads=False)
    assert_close_rms(out32, out64, 1e-5, "reference f32 vs f64")
    assert_lse_close(lse32, lse64, 1e-5, "reference f32 vs f64 lse")


def test_partition_is_exercised():
    """The partition backend must really run the block-sparse cases (not be skipped everywhere)."""
    accepted = []
    for case in CASES:
        for variant in VARIANTS:
            inputs = make_inputs(case, variant, torch.float32)
            reasons = BACKENDS["partition"].not_supported_reasons(problem_of(case, inputs))
            if case.partition:
                assert reasons == [], f"partition refused {case.id}/{variant}: {reasons}"
            if not reasons:
                accepted.append((case.id, variant))
    assert len(accepted) >= 20
    # and a stride != kernel case is refused with a reason naming the rule
    reasons = BACKENDS["partition"].not_supported_reasons(
        problem_of(CASES[0], make_inputs(CASES[0], "plain", torch.float32))
    )
    assert any("stride" in r for r in reasons)


def test_partition_with_key_bias_and_additional_keys():
    """partition accepts key_bias and additional keys (no rel_pos_bias): dedicated check of that path."""
    case = Case((6, 8), (2, 4), stride=(2, 4), causal=(False, True), batch=2, heads=2, dim=4)
    inputs = make_inputs(case, "extras", torch.float64)
    del inputs["tensors"]["rel_pos_bias"]
    assert BACKENDS["partition"].not_supported_reasons(problem_of(case, inputs)) == []
    out, lse, grads = run(case, "partition", inputs)
    ref_out, ref_lse, ref_grads = run(case, "reference", inputs)
    assert_close_rms(out, ref_out, 1e-10, "output")
    assert_lse_close(lse, ref_lse, 1e-10, "lse")
    for name in grads:
        assert_close_rms(grads[name], ref_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("backend", ["native", "tiled"])
@pytest.mark.parametrize(
    "geom",
    [
        dict(spatial=(5,), kernel=3, stride=2, dilation=1, causal=False),
        dict(spatial=(4, 5), kernel=(2, 3), stride=(1, 2), dilation=(2, 1), causal=(True, False)),
        dict(spatial=(3, 3, 4), kernel=2, stride=(1, 2, 1), dilation=(1, 1, 2), causal=(False, False, True)),
    ],
    ids=["1d", "2d", "3d"],
)
def test_gradcheck_float64(backend, geom):
    g = torch.Generator().manual_seed(1)
    rank = len(geom["spatial"])
    kernel = geom["kernel"] if isinstance(geom["kernel"], tuple) else (geom["kernel"],) * rank
    b, h, d, dv, n_add = 1, 2, 3, 2, 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = rnd(b, *geom["spatial"], h, d), rnd(b, *geom["spatial"], h, d), rnd(b, *geom["spatial"], h, dv)
    ak, av = rnd(b, n_add, h, d), rnd(b, n_add, h, dv)
    rpb = rnd(h, *(2 * kk - 1 for kk in kernel))
    kb = rnd(b, *geom["spatial"], 1)

    def fn(q, k, v, ak, av, rpb, kb):
        out, lse = ops.neighborhood_attention(
            q,
            k,
            v,
            geom["kernel"],
            geom["stride"],
            geom["dilation"],
            geom["causal"],
            scale=0.7,
            additional_keys=ak,
            additional_values=av,
            rel_pos_bias=rpb,
            key_bias=kb,
            return_lse=True,
            backend=backend,
        )
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, ak, av, rpb, kb), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "tiled"])
def test_gradcheck_float64_plain(backend):
    """No extras: the plain q/k/v path (without lse in the graph)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 4, 1, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: ops.na2d(q, k, v, (3, 2), stride=(2, 1), is_causal=(False, True), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


HALF_CASES = [CASES[9], CASES[13], CASES[17], CASES[4]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ops.list_backends())
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_half_precision_forward(case, backend, dtype):
    inputs = make_inputs(case, "lse", dtype)
    skip_or_check_refusal(case, backend, inputs, grads=False)
    out, lse, _ = run(case, backend, inputs, grads=False)
    assert out.dtype == dtype
    assert lse.dtype == torch.float32, "lse of half inputs is float32"
    # fp32 reference on the same (half-rounded) inputs
    ref = {"tensors": {n: x.float() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
    ref_out, ref_lse, _ = run(case, "reference", ref, grads=False)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close_rms(out.float(), ref_out, tol, f"{dtype} output")
    assert_close_rms(lse, ref_lse, 1e-5, f"{dtype} lse (computed in float32)")


@pytest.mark.parametrize("backend", ["native", "tiled", "reference"])
def test_all_keys_dropped(backend):
    """A query whose whole neighborhood has key_bias = -inf: output 0, lse -inf, finite (zero) gradients."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 1, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kb = torch.zeros(1, 6, 1, dtype=torch.float64)
    kb[0, :3] = float("-inf")  # queries 0 and 1 (window keys 0..2) lose every key; query 2's window is 1..3
    kb.requires_grad_(True)
    out, lse = ops.na1d(q, k, v, 3, key_bias=kb, return_lse=True, backend=backend)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.isneginf(lse[0, :2]).all() and torch.isfinite(lse[0, 2:]).all()
    # query 2 sees only key 3 of its window 1..3: its output is v[3]
    torch.testing.assert_close(out[0, 2], v[0, 3], rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v, kb))
    for name, grad in zip(["q", "k", "v", "key_bias"], grads):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
    assert torch.all(grads[0][0, :2] == 0), "queries with no keys get a zero gradient"


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("backend", ["partition", "reference"])
def test_all_keys_dropped_in_a_window(backend, return_lse):
    """Non-overlapping windows (stride = kernel) with one window's keys all at key_bias = -inf: its queries get
    output 0 (lse -inf) and zero gradients, on the partition backend's explicit-softmax path."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 6, 1, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kb = torch.zeros(1, 6, 1, dtype=torch.float64)
    kb[0, :3] = float("-inf")  # the first window, tokens 0..2
    kb.requires_grad_(True)
    res = ops.na1d(q, k, v, 3, stride=3, key_bias=kb, return_lse=return_lse, backend=backend)
    out = res[0] if return_lse else res
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    if return_lse:
        assert torch.isneginf(res[1][0, :3]).all() and torch.isfinite(res[1][0, 3:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, kb))
    for name, grad in zip(["q", "k", "v", "key_bias"], grads):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
    assert torch.all(grads[0][0, :3] == 0), "queries with no keys get a zero gradient"


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("backend", ["partition", "reference"])
def test_rel_pos_bias_masking_a_whole_head(backend, grad):
    """A -inf rel_pos_bias over one head's whole table leaves that head's queries without keys: output 0 and finite
    gradients on every path of the partition backend (SDPA without gradients, explicit scores with them)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8, 8, 2, 4, generator=g, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    rpb = torch.zeros(2, 7, 7, dtype=torch.float64)
    rpb[0] = float("-inf")
    rpb.requires_grad_(grad)
    out = ops.na2d(q, k, v, 4, stride=4, rel_pos_bias=rpb, backend=backend)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    if backend != "reference":
        reference = ops.na2d(q, k, v, 4, stride=4, rel_pos_bias=rpb, backend="reference")
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v, rpb))
        for name, grad_ in zip(["q", "k", "v", "rel_pos_bias"], grads):
            assert torch.isfinite(grad_).all(), f"non-finite gradient for {name}"


def test_auto_picks_native_on_cpu():
    from attnzoo.ops.backends import _native_lib

    assert _native_lib.unavailable_reason() is None, "the native kernel must build on Linux with g++"
    q = torch.randn(1, 6, 6, 2, 4)
    problem = make_problem(q, q, q, 3)
    assert BACKENDS["native"].not_supported_reasons(problem) == []
    assert select_backend("auto", problem).name == "native"
    # stride == kernel with divisible extents: SDPA over the partition, unless a key_bias or the lse needs scores
    assert select_backend("auto", make_problem(q, q, q, 3, stride=3)).name == "partition"
    t = q.clone().requires_grad_()
    assert select_backend("auto", make_problem(t, q, q, 3, stride=3)).name == "partition"
    key_bias = torch.zeros(1, 6, 6, 1)
    assert select_backend("auto", make_problem(q, q, q, 3, stride=3, key_bias=key_bias)).name == "native"
    assert select_backend("auto", make_problem(q, q, q, 3, stride=3, return_lse=True)).name == "native"
    assert select_backend("auto", make_problem(q[:, :5], q[:, :5], q[:, :5], 3, stride=3)).name == "native"


def test_explain_names_the_backend_and_the_reason():
    q = torch.randn(1, 6, 6, 2, 4)
    assert ops.explain(q, q, q, 3, stride=3).startswith("partition: non-overlapping windows")
    assert ops.explain(q, q, q, 3).startswith("native: first backend of the cpu auto order")
    assert ops.explain(q, q, q, 3, backend="tiled") == "tiled: requested by name"
    with pytest.raises(ValueError, match="partition"):
        ops.explain(q, q, q, 3, backend="partition")


def test_native_disabled_by_env_var(monkeypatch):
    """ATTNZOO_NATIVE=0 (read when the kernel is first loaded): native declines, auto falls back, explicit raises."""
    from attnzoo.ops.backends import _native_lib

    q = torch.randn(1, 7, 5, 2, 4, dtype=torch.float64)
    try:
        with monkeypatch.context() as mp:
            mp.setenv("ATTNZOO_NATIVE", "0")
            _native_lib.load.cache_clear()
            reasons = BACKENDS["native"].not_supported_reasons(make_problem(q, q, q, 3))
            assert any("ATTNZOO_NATIVE" in r for r in reasons), reasons
            assert select_backend("auto", make_problem(q, q, q, 3)).name != "native"
            assert (ops.na2d(q, q, q, 3) - ops.na2d(q, q, q, 3, backend="reference")).abs().max() < 1e-12
            with pytest.raises(ValueError, match="ATTNZOO_NATIVE"):
                ops.na2d(q, q, q, 3, backend="native")
    finally:
        _native_lib.load.cache_clear()  # the variable is restored: load the kernel again on next use
    assert _native_lib.unavailable_reason() is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend):
    """q, k, v as strided views of one fused qkv projection (the usual module layout)."""
    qkv = torch.randn(2, 6, 8, 3, 2, 4, dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    kw = dict(kernel_size=(2, 4), stride=(2, 4), return_lse=True)
    reasons = BACKENDS[backend].not_supported_reasons(make_problem(q, k, v, (2, 4), (2, 4), return_lse=True))
    if reasons:
        pytest.skip(f"{backend} declines: {'; '.join(reasons)}")
    out, lse = ops.na2d(q, k, v, backend=backend, **kw)
    ref, ref_lse = ops.na2d(q.contiguous(), k.contiguous(), v.contiguous(), backend="reference", **kw)
    assert_close_rms(out, ref, 1e-10, "output")
    assert_close_rms(lse, ref_lse, 1e-10, "lse")


def test_native_backward_with_several_threads():
    """The fused backward scatters into dk/dv from many queries: run it multi-threaded and compare."""
    case = Case((12, 11), 5, stride=(1, 2), dilation=(2, 1), causal=(False, True), batch=2, heads=3, dim=8)
    inputs = make_inputs(case, "extras", torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out, lse, grads = run(case, "native", inputs)
    finally:
        torch.set_num_threads(threads)
    ref_out, ref_lse, ref_grads = run(case, "reference", inputs)
    assert_close_rms(out, ref_out, 1e-10, "output")
    assert_lse_close(lse, ref_lse, 1e-10, "lse")
    for name in grads:
        assert_close_rms(grads[name], ref_grads[name], 1e-10, f"grad {name}")


SAVED_PROBABILITY_CASES = {
    # every extra input and -inf key biases: general blocks only
    "extras": (
        Case((9, 10), (3, 5), stride=(2, 1), dilation=(1, 2), causal=(True, False), batch=2, heads=2, dim=8),
        "extras",
    ),
    # rows of 21 float64 queries: lane tiles, clamped border windows (shuffled lanes), an overlapping last block
    "lane_tiles": (Case((12, 21), (5, 7), batch=2, heads=2, dim=8), "lse"),
}


@pytest.mark.parametrize("case_name", list(SAVED_PROBABILITY_CASES))
@pytest.mark.parametrize("saved", [True, False], ids=["saved_probs", "recomputed_probs"])
def test_native_backward_with_and_without_saved_probabilities(monkeypatch, saved, case_name):
    """The fused backward either reads the softmax probabilities its forward saved or recomputes them: both against
    the reference, on general blocks (with every extra input) and on lane tiles."""
    from attnzoo.ops.backends import native

    monkeypatch.setattr(native, "saves_probabilities", lambda *args: saved)
    case, variant = SAVED_PROBABILITY_CASES[case_name]
    inputs = make_inputs(case, variant, torch.float64)
    calls, fused_backward = [], native.kernel_backward
    monkeypatch.setattr(
        native, "kernel_backward", lambda *a, **kw: calls.append(kw["probs"]) or fused_backward(*a, **kw)
    )
    out, lse, grads = run(case, "native", inputs)
    assert (calls[0] is not None) == saved
    ref_out, ref_lse, ref_grads = run(case, "reference", inputs)
    assert_close_rms(out, ref_out, 1e-10, "output")
    for name in grads:
        assert_close_rms(grads[name], ref_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("saved", [True, False], ids=["saved_probs", "recomputed_probs"])
def test_eager_calls_skip_the_registered_ops_and_match_them(monkeypatch, saved):
    """Outside tracing the kernel runs under its own autograd.Function (no torch.library dispatch); its output, lse
    and every gradient, lse's included, equal those of the registered ops it stands in for, bit for bit."""
    from attnzoo.ops.backends import native

    monkeypatch.setattr(native, "saves_probabilities", lambda *args: saved)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 21, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 9, 13, dtype=torch.float64, requires_grad=True)
    out, lse = ops.na2d(q, k, v, (5, 7), dilation=(1, 2), rel_pos_bias=rpb, return_lse=True, backend="native")
    assert type(out.grad_fn).__name__ == "EagerNeighborhoodAttentionBackward"
    registered = torch.ops.attnzoo.na_forward_saving if saved else torch.ops.attnzoo.na_forward
    ref_out, ref_lse, *_ = registered(q, k, v, None, None, rpb, None, [5, 7], [1, 1], [1, 2], [False, False], 8**-0.5)
    assert "attnzoo" in type(ref_out.grad_fn).__name__
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    weights = torch.randn_like(out), torch.randn_like(lse)

    def grads(o, lse_):
        return torch.autograd.grad((o * weights[0]).sum() + (lse_ * weights[1]).sum(), (q, k, v, rpb))

    for got, want in zip(grads(out, lse), grads(ref_out, ref_lse)):
        assert torch.equal(got, want)
    with torch.no_grad():  # no autograd needed: the kernel is called directly, same numbers
        assert torch.equal(ops.na2d(q, k, v, (5, 7), dilation=(1, 2), rel_pos_bias=rpb, backend="native"), out)


def test_probabilities_are_saved_unless_they_outnumber_qkv(monkeypatch):
    """By default the forward saves the probabilities on every map, lane-tiled or not, except where they outnumber
    q, k and v's values (49 > 2·8 + 8); ATTNZOO_SAVE_PROBABILITIES=0 recomputes them, any value but 0 / 1 is refused."""
    from attnzoo.ops.backends import native

    def problem(width: int, kernel: int = 7, dilation: int = 1):
        q = torch.empty(1, 14, width, 2, 32)
        return make_problem(q, q, q, kernel, dilation=(1, dilation))

    monkeypatch.delenv("ATTNZOO_SAVE_PROBABILITIES", raising=False)
    assert native.saves_probabilities(problem(7), 32, 32)  # 7 < 8 lanes: general blocks
    assert native.saves_probabilities(problem(56), 32, 32)  # lane tiles
    assert native.saves_probabilities(problem(14), 32, 32)  # 8-lane tiles
    assert native.saves_probabilities(problem(56, dilation=8), 32, 32)  # dilation groups of 7
    assert not native.saves_probabilities(problem(7), 8, 8)  # 49 probabilities per query > 2·8 + 8
    assert not native.saves_probabilities(problem(56, kernel=11), 32, 32)  # 121 > 96
    monkeypatch.setenv("ATTNZOO_SAVE_PROBABILITIES", "1")
    assert native.saves_probabilities(problem(56), 32, 32)
    assert not native.saves_probabilities(problem(7), 8, 8)
    monkeypatch.setenv("ATTNZOO_SAVE_PROBABILITIES", "0")
    assert not native.saves_probabilities(problem(7), 32, 32)
    assert not native.saves_probabilities(problem(56), 32, 32)
    monkeypatch.setenv("ATTNZOO_SAVE_PROBABILITIES", "yes")
    with pytest.raises(ValueError, match="ATTNZOO_SAVE_PROBABILITIES='yes' must be '0'"):
        native.saves_probabilities(problem(56), 32, 32)
