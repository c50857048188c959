"""The native kernel's lane tiles (queries as SIMD lanes, tiles of up to 3 query rows) against the reference, forward
and backward, in float32 (16 lanes; 8 on rows narrower than 16) and float64 (8 lanes): rows that are and are not
multiples of the lane count (a last block overlapping its predecessor), clamped border windows (shuffled lanes),
query-row counts that leave a short last tile, dilation, causal axes, non-overlapping windows, kernels too wide for
the shuffle, 1-D and 3-D, relative position biases."""

from __future__ import annotations

import pytest
import torch

from backend_sweep import assert_native_matches_reference

# spatial shape (batch 1 or 2, heads 2), kernel, and the window options
CASES = {
    "rows_of_37_k7": ((2, 20, 37), 7, {}),
    "rows_of_16_exact": ((1, 7, 16), 5, {}),
    "rows_of_14_half_width_vectors": ((2, 14, 14), 7, {}),
    "rows_of_7_general_blocks": ((2, 7, 7), 7, {}),
    "rows_of_40_dilated": ((1, 18, 40), 7, {"dilation": (1, 2)}),
    "causal_rows": ((1, 10, 41), 7, {"is_causal": (True, True)}),
    "causal_last_axis": ((1, 8, 33), 5, {"is_causal": (False, True)}),
    "non_overlapping_windows": ((1, 14, 42), 7, {"stride": 7}),
    "kernel_21_wider_than_two_vectors": ((1, 25, 45), 21, {}),
    "one_dimensional_k19": ((2, 100), 19, {}),
    "three_dimensional": ((1, 4, 18, 33), (3, 3, 9), {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_lane_tiles_match_the_reference(case, dtype):
    spatial, kernel, options = CASES[case]
    rank = len(spatial) - 1
    kernels = (kernel,) * rank if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(0)
    shape = (spatial[0], *spatial[1:], 2, 16)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3))
    rpb = torch.randn(2, *(2 * kk - 1 for kk in kernels), generator=gen, dtype=torch.float64).to(dtype)
    rpb.requires_grad_()
    cotangent = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_native_matches_reference((q, k, v, rpb), cotangent, tol, kernel_size=kernel, rel_pos_bias=rpb, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_each_lane_has_its_own_softmax_maximum(dtype):
    """A query whose logits dwarf its neighbours' (the first lane of every block): every lane's softmax is shifted by
    its own maximum, so the neighbours' weights do not underflow to an empty sum."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 40, 1, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    q[0, :, ::16] *= 200.0
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    cotangent = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype)
    assert_native_matches_reference((q, k, v), cotangent, 1e-10 if dtype == torch.float64 else 2e-5, kernel_size=7)
