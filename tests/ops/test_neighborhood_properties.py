"""Paper properties of generalized neighborhood attention, checked independently.

* ``neighborhood_mask`` against a brute-force implementation of the per-axis rule written here in plain loops;
  every backend (rel_pos_bias, key_bias, additional keys) against a hand softmax over that brute-force mask.
* kernel = extent, dilation 1, non-causal ⇒ global attention; stride = kernel ⇒ independent windows;
  dilation δ ⇒ NA with δ = 1 on every sub-lattice ``x[r::δ]``; causal ⇒ no dependence on later tokens;
  every non-causal query sees exactly Πk keys; ``rel_pos_bias`` is indexed by key − query (entries by hand).
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.problem import make_problem

from conftest import hand_attention, rand64

BACKEND_NAMES = ops.list_backends()


# ----------------------------------------------------------------------------------------------------------------
# brute force geometry (plain Python, straight from the per-axis rule in ops/geometry.py's docstring)


def brute_axis_keys(x: int, L: int, k: int, st: int, dil: int, causal: bool) -> set[int]:
    r = x % dil
    xp = x // dil
    L_r = L // dil + (1 if r < L % dil else 0)
    if causal:
        leader = min((xp // st) * st + st - 1, L_r - 1)
        us = [u for u in range(L_r) if max(0, leader - k + 1) <= u <= xp]
    else:
        left = k // 2
        right = k // 2 + (k % 2) - 1
        leader = min((xp // st) * st + st // 2, L_r - 1)
        centre = leader
        if centre < left:
            centre = left
        if centre > L_r - 1 - right:
            centre = L_r - 1 - right
        us = [u for u in range(L_r) if centre - left <= u <= centre + right]
    return {r + dil * u for u in us}


def brute_mask(shape, kernel, stride, dilation, causal) -> list[list[bool]]:
    coords = list(itertools.product(*(range(n) for n in shape)))  # row-major, last axis fastest
    per_axis = []
    for axis, L in enumerate(shape):
        per_axis.append(
            [brute_axis_keys(x, L, kernel[axis], stride[axis], dilation[axis], causal[axis]) for x in range(L)]
        )
    return [[all(kc[a] in per_axis[a][qc[a]] for a in range(len(shape))) for kc in coords] for qc in coords]


def _one_d_combos():
    for L in range(1, 12):
        for k in range(1, L + 1):
            for dil in range(1, L // k + 1):
                for st in range(1, k + 1):
                    for causal in (False, True):
                        yield L, k, st, dil, causal


ONE_D = list(_one_d_combos())


def test_mask_matches_brute_force_1d():
    assert len(ONE_D) > 500
    for L, k, st, dil, causal in ONE_D:
        expected = torch.tensor(brute_mask((L,), (k,), (st,), (dil,), (causal,)))
        got = ops.neighborhood_mask((L,), k, st, dil, causal)
        assert got.dtype == torch.bool
        assert torch.equal(got, expected), f"L={L} k={k} stride={st} dilation={dil} causal={causal}"


MULTI_D = [
    ((5, 7), (3, 4), (2, 3), (1, 1), (False, True)),
    ((6, 9), (2, 3), (1, 2), (3, 2), (True, False)),
    ((7, 4), (4, 2), (4, 1), (1, 2), (True, True)),
    ((8, 8), (2, 2), (2, 2), (4, 3), (False, False)),
    ((3, 4, 5), (2, 3, 2), (1, 3, 2), (1, 1, 2), (False, True, False)),
    ((4, 3, 6), (2, 2, 3), (2, 1, 1), (2, 1, 2), (True, False, True)),
]


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", MULTI_D)
def test_mask_matches_brute_force_nd(shape, kernel, stride, dilation, causal):
    expected = torch.tensor(brute_mask(shape, kernel, stride, dilation, causal))
    assert torch.equal(ops.neighborhood_mask(shape, kernel, stride, dilation, causal), expected)


def test_non_causal_query_sees_exactly_prod_k_keys():
    for L, k, st, dil, causal in ONE_D:
        if not causal:
            assert (ops.neighborhood_mask((L,), k, st, dil, False).sum(1) == k).all()
    for shape, kernel, stride, dilation, _ in MULTI_D:
        counts = ops.neighborhood_mask(shape, kernel, stride, dilation, False).sum(1)
        assert (counts == math.prod(kernel)).all()


def test_causal_queries_see_only_earlier_keys_and_themselves():
    upper = torch.ones(11, 11, dtype=torch.bool).triu(1)
    for L, k, st, dil, causal in ONE_D:
        if causal:
            m = ops.neighborhood_mask((L,), k, st, dil, True)
            assert not (m & upper[:L, :L]).any()
            assert m.diagonal().all()
            assert int(m.sum(1).max()) <= k


# ----------------------------------------------------------------------------------------------------------------
# properties of the op, every backend


def _skip_unsupported(backend, q, k, v, **kw):
    reasons = BACKENDS[backend].not_supported_reasons(make_problem(q, k, v, **kw))
    if reasons:
        pytest.skip("; ".join(reasons))


ORACLE_CASES = MULTI_D + [((6, 8), (3, 2), (3, 2), (1, 2), (True, False))]  # the last one partition runs too


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", ORACLE_CASES)
def test_matches_brute_force_softmax(backend, shape, kernel, stride, dilation, causal):
    """The whole op (rel_pos_bias, key_bias with dropped keys, additional keys) against a hand softmax over the
    brute-force mask; the bias table entry per axis is (key − query) in sub-lattice units + k − 1."""
    b, h, d, n_add = 1, 2, 4, 2
    q, k, v = (rand64(b, *shape, h, d, seed=s) for s in (40, 41, 42))
    ak, av = rand64(b, n_add, h, d, seed=43), rand64(b, n_add, h, d, seed=44)
    table = rand64(h, *(2 * kk - 1 for kk in kernel), seed=45)
    key_bias = rand64(b, *shape, h, seed=46)
    key_bias.view(-1)[::5] = float("-inf")  # drop every fifth key
    kw = dict(
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        is_causal=causal,
        additional_keys=ak,
        additional_values=av,
        rel_pos_bias=table,
        key_bias=key_bias,
    )
    _skip_unsupported(backend, q, k, v, **kw)
    out, lse = ops.neighborhood_attention(q, k, v, return_lse=True, backend=backend, **kw)

    coords = list(itertools.product(*(range(n) for n in shape)))
    n = len(coords)
    allowed = torch.tensor(brute_mask(shape, kernel, stride, dilation, causal))
    rpb = torch.zeros(h, n, n, dtype=torch.float64)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            if allowed[i, j]:
                entry = tuple(kc[a] // dilation[a] - qc[a] // dilation[a] + kernel[a] - 1 for a in range(len(shape)))
                assert all(0 <= e <= 2 * kk - 2 for e, kk in zip(entry, kernel))
                rpb[:, i, j] = table[(slice(None), *entry)]
    bias = rpb + key_bias.reshape(b, n, h).transpose(1, 2)[:, :, None, :]  # [b, h, n, n]
    # the additional keys: seen by every query, without bias
    bias = torch.cat([bias, torch.zeros(b, h, n, n_add, dtype=torch.float64)], -1)
    allowed = torch.cat([allowed, torch.ones(n, n_add, dtype=torch.bool)], -1).expand(b, h, n, n + n_add)
    keys, values = torch.cat([k.reshape(b, n, h, d), ak], 1), torch.cat([v.reshape(b, n, h, d), av], 1)
    exp_out, exp_lse = hand_attention(q, keys, values, d**-0.5, allowed=allowed, bias=bias)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 2)], ids=["1d", "2d", "3d"])
def test_full_kernel_is_global_attention(backend, shape):
    q, k, v = rand64(2, *shape, 2, 4, seed=1), rand64(2, *shape, 2, 4, seed=2), rand64(2, *shape, 2, 3, seed=3)
    _skip_unsupported(backend, q, k, v, kernel_size=shape)
    out, lse = ops.neighborhood_attention(q, k, v, shape, return_lse=True, backend=backend)
    ref, ref_lse = ops.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    # and against a hand-written softmax, token by token
    torch.testing.assert_close(out, hand_attention(q, k, v, 0.5)[0], rtol=1e-10, atol=1e-10)


WINDOW_CASES = [
    ((8,), (4,), (1,), (False,)),
    ((6, 8), (3, 4), (1, 1), (False, False)),
    ((6, 8), (3, 2), (1, 2), (False, True)),  # dilated windows: each a chunk of a sub-lattice; causal inside
    ((4, 6, 4), (2, 3, 2), (1, 1, 2), (True, False, False)),
]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape,kernel,dilation,causal", WINDOW_CASES)
def test_stride_equal_kernel_is_independent_windows(backend, shape, kernel, dilation, causal):
    heads, d = 2, 4
    q, k, v = (rand64(1, *shape, heads, d, seed=s) for s in (4, 5, 6))
    kw = dict(kernel_size=kernel, stride=kernel, dilation=dilation, is_causal=causal)
    _skip_unsupported(backend, q, k, v, **kw)
    out = ops.neighborhood_attention(q, k, v, backend=backend, **kw)

    def window(c):  # window id of a coordinate: per axis (x // (k·δ), x % δ)
        return tuple((x // (kk * dd), x % dd) for x, kk, dd in zip(c, kernel, dilation))

    def sees(qc, kc):  # same window and, along each causal axis, not after the query
        return window(kc) == window(qc) and all(kc[a] <= qc[a] or not causal[a] for a in range(len(shape)))

    coords = list(itertools.product(*(range(n) for n in shape)))
    sizes = collections.Counter(window(c) for c in coords)
    assert len(sizes) == math.prod(n // kk for n, kk in zip(shape, kernel))
    assert set(sizes.values()) == {math.prod(kernel)}
    allowed = torch.tensor([[sees(qc, kc) for kc in coords] for qc in coords])
    expected, _ = hand_attention(q, k, v, d**-0.5, allowed=allowed.expand(1, heads, *allowed.shape))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


SUBLATTICE_CASES = [
    ((12,), (3,), (1,), (3,), (False,)),
    ((11,), (3,), (2,), (2,), (True,)),  # 11 not divisible by 2: sub-lattices of lengths 6 and 5
    ((8, 9), (2, 3), (1, 2), (2, 3), (False, True)),
    ((10, 7), (4, 2), (3, 2), (2, 3), (True, False)),  # 7 = 3+2+2: uneven sub-lattices
    ((4, 6, 6), (2, 3, 2), (1, 1, 2), (2, 2, 3), (False, False, True)),
]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", SUBLATTICE_CASES)
def test_dilation_is_na_on_each_sublattice(backend, shape, kernel, stride, dilation, causal):
    q, k, v = (rand64(2, *shape, 2, 4, seed=s) for s in (7, 8, 9))
    kw = dict(kernel_size=kernel, stride=stride, is_causal=causal)
    _skip_unsupported(backend, q, k, v, dilation=dilation, **kw)
    out = ops.neighborhood_attention(q, k, v, dilation=dilation, backend=backend, **kw)
    for offsets in itertools.product(*(range(dd) for dd in dilation)):
        sl = (slice(None),) + tuple(slice(r, None, dd) for r, dd in zip(offsets, dilation))
        sub = ops.neighborhood_attention(q[sl], k[sl], v[sl], backend="reference", **kw)
        torch.testing.assert_close(out[sl], sub, rtol=1e-10, atol=1e-10)


CAUSAL_CASES = [
    ((10,), 3, 1, 1, (True,), 0, 6),
    ((11,), 4, 2, 2, (True,), 0, 5),
    ((6, 7), (3, 2), (1, 2), (1, 2), (True, False), 0, 3),
    ((6, 7), (2, 3), (2, 1), 1, (False, True), 1, 4),
    ((4, 5, 4), 2, 1, (1, 2, 1), (True, True, False), 1, 2),
]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,axis,t", CAUSAL_CASES)
def test_causal_ignores_later_tokens(backend, shape, kernel, stride, dilation, causal, axis, t):
    q, k, v = (rand64(1, *shape, 2, 4, seed=s) for s in (10, 11, 12))
    kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    _skip_unsupported(backend, q, k, v, **kw)
    out = ops.neighborhood_attention(q, k, v, backend=backend, **kw)
    later = (slice(None),) * (1 + axis) + (slice(t, None),)
    earlier = (slice(None),) * (1 + axis) + (slice(None, t),)
    k2, v2 = k.clone(), v.clone()
    k2[later] += rand64(*k2[later].shape, seed=13)
    v2[later] += rand64(*v2[later].shape, seed=14)
    out2 = ops.neighborhood_attention(q, k2, v2, backend=backend, **kw)
    torch.testing.assert_close(out2[earlier], out[earlier], rtol=1e-12, atol=1e-12)
    assert (out2[later] - out[later]).abs().max() > 1e-3  # the perturbation is real


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "partition"])
def test_rel_pos_bias_is_key_minus_query_1d(backend):
    """q = 0, so the logits are the bias alone; weights = softmax of the table entries picked by key − query."""
    L, kk = 7, 3
    q = torch.zeros(1, L, 1, 2, dtype=torch.float64)
    k = rand64(1, L, 1, 2, seed=15)
    v = torch.arange(L, dtype=torch.float64).reshape(1, L, 1, 1).repeat(1, 1, 1, 2) * torch.tensor(
        [1.0, -2.0], dtype=torch.float64
    )
    table = torch.tensor(
        [[0.3, -1.1, 0.7, 2.0, -0.4]], dtype=torch.float64
    )  # [heads, 2k-1], entry j <-> key-query = j-2
    _skip_unsupported(backend, q, k, v, kernel_size=kk, rel_pos_bias=table)
    out = ops.na1d(q, k, v, kk, rel_pos_bias=table, backend=backend)

    def expect(keys, entries):
        w = torch.softmax(table[0, entries], 0)
        return sum(wi * v[0, key, 0] for wi, key in zip(w, keys))

    # query 0: window shifted inward to keys 0,1,2 -> offsets 0,1,2 -> entries 2,3,4
    torch.testing.assert_close(out[0, 0, 0], expect([0, 1, 2], [2, 3, 4]), rtol=1e-12, atol=1e-12)
    # query 3: keys 2,3,4 -> offsets -1,0,1 -> entries 1,2,3
    torch.testing.assert_close(out[0, 3, 0], expect([2, 3, 4], [1, 2, 3]), rtol=1e-12, atol=1e-12)
    # query 6: keys 4,5,6 -> offsets -2,-1,0 -> entries 0,1,2
    torch.testing.assert_close(out[0, 6, 0], expect([4, 5, 6], [0, 1, 2]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "partition"])
def test_rel_pos_bias_is_key_minus_query_2d_dilated(backend):
    """2-D, dilation 2 along rows: offsets are counted in sub-lattice units; one query worked out by hand."""
    H, W, kk = 6, 5, 3
    q = torch.zeros(1, H, W, 2, 2, dtype=torch.float64)
    k = rand64(1, H, W, 2, 2, seed=16)
    v = rand64(1, H, W, 2, 2, seed=17)
    table = rand64(2, 5, 5, seed=18)
    _skip_unsupported(backend, q, k, v, kernel_size=kk, dilation=(2, 1), rel_pos_bias=table)
    out = ops.na2d(q, k, v, kk, dilation=(2, 1), rel_pos_bias=table, backend=backend)
    # query (row 1, col 4): rows 1,3,5 form its sub-lattice (x'=0 -> keys u=0,1,2 -> rows 1,3,5, offsets 0,1,2);
    # col 4 is at the right border: keys cols 2,3,4, offsets -2,-1,0
    keys = [(r, c) for r in (1, 3, 5) for c in (2, 3, 4)]
    entries = [(dr + 2, dc + 2) for dr in (0, 1, 2) for dc in (-2, -1, 0)]
    for h in range(2):
        logits = torch.stack([table[h, i, j] for i, j in entries])
        w = torch.softmax(logits, 0)
        expected = sum(wi * v[0, r, c, h] for wi, (r, c) in zip(w, keys))
        torch.testing.assert_close(out[0, 1, 4, h], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_constant_key_bias_shifts_lse_only(backend):
    q, k, v = (rand64(1, 6, 8, 2, 4, seed=s) for s in (19, 20, 21))
    kw = dict(kernel_size=(3, 4), stride=(3, 4))
    _skip_unsupported(backend, q, k, v, **kw)
    out, lse = ops.na2d(q, k, v, return_lse=True, backend=backend, **kw)
    kb = torch.full((1, 1, 1, 1), 1.75, dtype=torch.float64)
    out2, lse2 = ops.na2d(q, k, v, return_lse=True, backend=backend, key_bias=kb, **kw)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse2, lse + 1.75, rtol=1e-12, atol=1e-12)
