"""The geometry sweep the backend tests share: the cases, their inputs, one call with gradients, and the comparisons.

Used by tests/ops/test_backends.py (every backend against ``reference``) and tests/ops/test_flex_and_natten_backends.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attnzoo.ops as ops
from attnzoo.ops.problem import make_problem

from conftest import DEVICE


@dataclass(frozen=True)
class Case:
    spatial: tuple
    kernel: object
    stride: object = 1
    dilation: object = 1
    causal: object = False
    batch: int = 1
    heads: int = 1
    dim: int = 8
    dim_v: int | None = None
    partition: bool = False  # the partition backend must accept every variant of this case

    @property
    def id(self) -> str:
        parts = [
            "x".join(map(str, self.spatial)),
            f"k{self.kernel}",
            f"s{self.stride}",
            f"d{self.dilation}",
            f"c{self.causal}",
            f"b{self.batch}h{self.heads}",
            f"dim{self.dim}v{self.dim_v or self.dim}",
        ]
        return "-".join(str(p).replace(" ", "") for p in parts)


CASES = [
    # 1-D
    Case((7,), 3),
    Case((2,), 2, dim=4),  # smallest legal problem
    Case((9,), 4, stride=2, heads=2, dim=4),  # even kernel, stride
    Case((11,), 3, dilation=3, dim=16, dim_v=5),  # 11 not divisible by 3, dim_v != dim
    Case((13,), 3, dilation=2, causal=True, batch=2),
    Case((10,), 5, stride=2, causal=True, dim=3),
    Case((8,), 4, stride=4, partition=True, heads=3),
    Case((12,), 3, stride=3, dilation=2, causal=True, partition=True),
    Case((6,), 6, dim=4),  # kernel = extent
    # 2-D
    Case((7, 9), (3, 5), batch=2, heads=2),
    Case((5, 6), 2, dim=4, dim_v=6),  # even kernel at the smallest size
    Case((9, 10), 3, dilation=(2, 3), heads=2, dim=4),  # neither extent divisible by its dilation
    Case((8, 6), (4, 3), stride=(3, 2), dilation=(2, 1), causal=(False, True), dim=4),
    Case((6, 8), (2, 4), stride=(2, 4), causal=(True, False), batch=2, partition=True),
    Case((12, 8), (3, 4), stride=(3, 4), dilation=(2, 2), heads=2, dim=4, dim_v=3, partition=True),
    Case((5, 5), 5, dim=4),  # kernel = full extent: global attention
    Case((7, 5), (4, 2), stride=(4, 1), causal=(True, True), dim=4),
    # 3-D
    Case((4, 5, 3), (2, 3, 3), heads=2, dim=4),
    Case((4, 6, 4), 2, stride=2, causal=(True, False, True), partition=True, dim=4),
    Case((5, 4, 6), (3, 2, 3), stride=(2, 1, 3), dilation=(1, 2, 2), causal=(False, True, False), dim=4, dim_v=2),
    Case((3, 4, 5), (3, 2, 2), dilation=(1, 2, 2), causal=(True, False, False), batch=2, dim=2),
]


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    den = expected.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((actual - expected).pow(2).mean().sqrt() / den)


def assert_close_rms(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_rms(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.0e}"


def assert_lse_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: -inf pattern differs"
    assert torch.equal(actual[~fin], expected[~fin]), f"{what}: non-finite entries differ"
    assert_close_rms(actual[fin], expected[fin], tol, what)


def make_inputs(case: Case, variant: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Leaf tensors (float64 draws cast to ``dtype``) and keyword arguments for one call."""
    g = torch.Generator().manual_seed(seed)
    b, h, d, dv = case.batch, case.heads, case.dim, case.dim_v or case.dim
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    t = {"q": rnd(b, *case.spatial, h, d), "k": rnd(b, *case.spatial, h, d), "v": rnd(b, *case.spatial, h, dv)}
    kw = {"return_lse": variant != "plain"}
    if variant.startswith("extras"):
        rank = len(case.spatial)
        kernel = case.kernel if isinstance(case.kernel, tuple) else (case.kernel,) * rank
        n_add = 3
        t["additional_keys"] = rnd(b, n_add, h, d)
        t["additional_values"] = rnd(b, n_add, h, dv)
        t["rel_pos_bias"] = rnd(h, *(2 * kk - 1 for kk in kernel))
        if variant == "extras":
            # full-shape key bias with about a quarter of the keys dropped (-inf); additional keys keep every
            # query's softmax non-empty
            kb = rnd(b, *case.spatial, h)
            drop = (torch.rand(kb.shape, generator=g) < 0.25).to(DEVICE)
            t["key_bias"] = kb.masked_fill(drop, float("-inf"))
        else:
            kb = rnd(1, *case.spatial, 1)
            t["key_bias"] = kb
    return {"tensors": t, "kwargs": kw}


def problem_of(case: Case, inputs: dict, grads: bool = False):
    """The engine's problem description for one case and its inputs (leaves detached, ``grads`` as requires_grad)."""
    t = {n: x.detach().requires_grad_(grads) for n, x in inputs["tensors"].items()}
    return make_problem(
        t["q"],
        t["k"],
        t["v"],
        case.kernel,
        case.stride,
        case.dilation,
        case.causal,
        t.get("additional_keys"),
        t.get("additional_values"),
        t.get("rel_pos_bias"),
        inputs["kwargs"]["return_lse"],
        t.get("key_bias"),
    )


def run(case: Case, backend: str, inputs: dict, grads: bool = True):
    """Forward (and backward with fixed random cotangents); returns (out, lse, {name: grad})."""
    leaves = {n: x.detach().clone().requires_grad_(grads) for n, x in inputs["tensors"].items()}
    res = ops.neighborhood_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        case.kernel,
        case.stride,
        case.dilation,
        case.causal,
        additional_keys=leaves.get("additional_keys"),
        additional_values=leaves.get("additional_values"),
        rel_pos_bias=leaves.get("rel_pos_bias"),
        key_bias=leaves.get("key_bias"),
        backend=backend,
        **inputs["kwargs"],
    )
    out, lse = res if inputs["kwargs"]["return_lse"] else (res, None)
    if not grads:
        return out, lse, {}
    g = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)).sum()
    if lse is not None:
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (
            loss + (finite * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.device, lse.dtype)).sum()
        )
    names = list(leaves)
    grads_ = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return out, lse, dict(zip(names, grads_))


def assert_native_matches_reference(leaves, cotangent, tol: float, atol: float | None = None, **kwargs) -> None:
    """``neighborhood_attention(*leaves[:3], **kwargs)`` on ``native`` against ``reference``: the output and the
    gradients of every leaf (q, k, v and whatever else requires grad, e.g. a rel_pos_bias passed in ``kwargs`` too),
    finite and within rtol ``tol`` and atol ``atol`` (default: ``tol`` times the largest reference value, at least 1)."""
    results = {}
    for backend in ("native", "reference"):
        out = ops.neighborhood_attention(*leaves[:3], backend=backend, **kwargs)
        results[backend] = (out, *torch.autograd.grad(out, leaves, cotangent))
    names = ("out", "dq", "dk", "dv", *(f"d leaf {i}" for i in range(3, len(leaves))))
    for name, got, want in zip(names, results["native"], results["reference"]):
        assert torch.isfinite(got).all(), name
        bound = atol if atol is not None else tol * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=tol, atol=bound, msg=name)
