"""The native kernel's work split against the reference, forward and backward: bands of query-row tiles and parts of
every tile's lane blocks over 1-3 threads, and the per-worker rings of transposed K/V rows (a ring smaller than the
map, rows shared by consecutive tiles, q/k/v as strided views of one fused projection)."""

from __future__ import annotations

import pytest
import torch

from backend_sweep import assert_native_matches_reference

# spatial shape with batch first, heads, kernel, window options
CASES = {
    "one_head_bands": ((1, 40, 40), 1, 7, {}),
    "one_dimensional_parts": ((1, 300), 1, 9, {}),
    "three_dimensional_dilated_ring_smaller_than_map": ((1, 6, 20, 20), 2, (3, 5, 5), {"dilation": (2, 1, 2)}),
    "causal_rows_dilated": ((2, 24, 33), 2, 5, {"is_causal": (True, False), "dilation": (2, 1)}),
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fused_projection", [False, True], ids=["contiguous", "qkv_views"])
@pytest.mark.parametrize("case", list(CASES))
def test_work_split_matches_the_reference(case, fused_projection, threads):
    spatial, heads, kernel, options = CASES[case]
    gen = torch.Generator().manual_seed(1)
    shape = (*spatial, heads, 16)
    if fused_projection:
        qkv = torch.randn(*spatial, 3, heads, 16, generator=gen, dtype=torch.float64)
        q, k, v = (qkv.select(-3, i).detach().requires_grad_() for i in range(3))
    else:
        q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    cotangent = torch.randn(*shape, generator=gen, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_native_matches_reference((q, k, v), cotangent, 1e-10, atol=1e-10, kernel_size=kernel, **options)
    finally:
        torch.set_num_threads(previous)
