"""The native kernel's key tiles (dK and dV of up to 3 neighbouring key rows gathered together from the union of the
window rows holding them) against the reference: every head width the tiles specialise (half, one and two 64-byte
vectors in float32 and float64), widths they hand to one key at a time (four vectors, widths no vector divides,
value width unlike the key width), key-row counts that leave a short last tile, tiles that cross a leading axis of a
3-D map, clamped, dilated and causal windows, and backwards that read the forward's saved probabilities or recompute
them."""

from __future__ import annotations

import pytest
import torch

from backend_sweep import assert_native_matches_reference

# spatial shape (batch first), kernel, window options
GEOMETRIES = {
    "rows_of_30_k7": ((1, 11, 30), 7, {}),
    "dilated_causal": ((1, 13, 26), 5, {"dilation": (2, 1), "is_causal": (True, False)}),
    "three_dimensional_tiles_cross_depth": ((1, 3, 5, 20), (3, 3, 5), {}),
}

# (key width, value width)
WIDTHS = {
    "half_vector": (8, 8),
    "one_vector": (16, 16),
    "two_vectors": (32, 32),
    "four_vectors": (64, 64),
    "no_vector": (12, 12),
    "value_wider": (16, 24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_key_tiles_match_the_reference(geometry, width, dtype):
    spatial, kernel, options = GEOMETRIES[geometry]
    dim, dim_v = WIDTHS[width]
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(*spatial, 2, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*spatial, 2, dim_v, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    cotangent = torch.randn(*spatial, 2, dim_v, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_native_matches_reference((q, k, v), cotangent, tol, kernel_size=kernel, **options)


@pytest.mark.parametrize("saved", ["1", "0"], ids=["saved_probs", "recomputed_probs"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_key_tiles_with_saved_and_recomputed_probabilities(geometry, saved, monkeypatch):
    from attnzoo.ops.backends import native

    monkeypatch.setenv("ATTNZOO_SAVE_PROBABILITIES", saved)
    read, fused_backward = [], native.kernel_backward
    monkeypatch.setattr(
        native, "kernel_backward", lambda *a, **kw: read.append(kw["probs"]) or fused_backward(*a, **kw)
    )
    spatial, kernel, options = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*spatial, 2, 32, generator=gen).requires_grad_() for _ in range(3))
    cotangent = torch.randn(*spatial, 2, 32, generator=gen)
    assert_native_matches_reference((q, k, v), cotangent, 2e-5, kernel_size=kernel, **options)
    assert [p is not None for p in read] == [saved == "1"]  # the backward read what the forward was told to save
