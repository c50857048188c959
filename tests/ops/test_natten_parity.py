"""Parity of ``attnzoo.ops.na{1,2,3}d`` with ``natten.functional.na{1,2,3}d`` (natten 0.21.7).

natten on CPU runs FlexAttention eagerly: forward only, float32, head_dim a power of two. Sweeps cover 1/2/3-D,
odd and even kernels, stride, dilation (with extents not divisible by it), mixed causal axes and natten's
additional keys/values. Both the default backend and the dense reference are compared, outputs and logsumexp.
"""

from __future__ import annotations

import logging
import warnings
import zlib

import pytest
import torch

import attnzoo.ops as ops

natten_functional = pytest.importorskip("natten.functional")

pytestmark = [pytest.mark.natten, pytest.mark.filterwarnings("ignore")]

ATOL = 1e-5

# (spatial, kernel, stride, dilation, causal, heads, head_dim, head_dim_v, n_additional)
CASES = {
    1: [
        ((9,), 3, 1, 1, False, 2, 8, 8, 0),
        ((12,), 4, 3, 1, False, 1, 16, 16, 0),
        ((11,), 3, 2, 3, False, 2, 8, 8, 0),  # 11 not divisible by the dilation
        ((10,), 5, 2, 1, True, 1, 8, 8, 0),
        ((13,), 3, 1, 2, True, 2, 8, 8, 3),
        ((8,), 4, 4, 1, False, 1, 8, 8, 2),
        ((6,), 6, 1, 1, False, 1, 8, 8, 0),
        ((2,), 2, 1, 1, False, 1, 8, 8, 0),
    ],
    2: [
        ((7, 9), (3, 5), 1, 1, False, 2, 8, 8, 0),
        ((8, 6), (4, 3), (3, 2), (2, 1), (False, True), 1, 8, 8, 0),
        ((9, 10), 3, (2, 1), (2, 3), False, 2, 8, 8, 2),
        ((6, 8), (2, 4), (2, 4), 1, (True, False), 1, 16, 16, 0),
        ((7, 5), (4, 2), (4, 1), 1, (True, True), 1, 8, 8, 3),
        ((5, 6), 2, 1, 1, False, 1, 8, 8, 0),
    ],
    3: [
        ((4, 5, 3), (2, 3, 3), 1, 1, False, 2, 8, 8, 0),
        ((5, 4, 6), (3, 2, 3), (2, 1, 3), (1, 2, 2), (False, True, False), 1, 8, 8, 2),
        ((4, 6, 4), 2, 2, 1, (True, False, True), 1, 8, 8, 0),
    ],
}
PARAMS = [(rank, c) for rank, cs in CASES.items() for c in cs]


def _id(p):
    rank, (spatial, k, s, d, c, h, dim, dim_v, n) = p
    return f"{rank}d-{'x'.join(map(str, spatial))}-k{k}-s{s}-d{d}-c{c}-h{h}-dim{dim}-add{n}".replace(" ", "")


def _natten(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        finally:
            logging.disable(previous)


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_matches_natten(param):
    rank, (spatial, kernel, stride, dilation, causal, heads, dim, dim_v, n_add) = param
    g = torch.Generator().manual_seed(zlib.crc32(_id(param).encode()))
    q, k = (torch.randn(2, *spatial, heads, dim, generator=g) for _ in range(2))
    v = torch.randn(2, *spatial, heads, dim_v, generator=g)
    extra = {}
    if n_add:
        extra = dict(
            additional_keys=torch.randn(2, n_add, heads, dim, generator=g),
            additional_values=torch.randn(2, n_add, heads, dim_v, generator=g),
        )
    args = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, **extra)
    expected, expected_lse = _natten(getattr(natten_functional, f"na{rank}d"), q, k, v, return_lse=True, **args)
    ours = getattr(ops, f"na{rank}d")
    for backend in ("auto", "reference"):
        out, lse = ours(q, k, v, return_lse=True, backend=backend, **args)
        assert out.shape == expected.shape
        err = (out - expected).abs().max().item()
        assert err <= ATOL, f"backend={backend}: max abs error {err:.2e} vs natten"
        assert lse.shape == expected_lse.shape
        lse_err = (lse - expected_lse).abs().max().item()
        assert lse_err <= ATOL, f"backend={backend}: lse max abs error {lse_err:.2e} vs natten"


def test_matches_natten_with_scale():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 8, 7, 2, 8, generator=g) for _ in range(3))
    expected = _natten(natten_functional.na2d, q, k, v, kernel_size=3, dilation=2, scale=0.3)
    out = ops.na2d(q, k, v, kernel_size=3, dilation=2, scale=0.3)
    assert (out - expected).abs().max().item() <= ATOL
    # and a different scale really changes the result (the comparison is not vacuous)
    assert (ops.na2d(q, k, v, kernel_size=3, dilation=2) - expected).abs().max().item() > 1e-3
