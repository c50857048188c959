"""The geometry of generalized neighborhood attention: which keys each query sees.

Semantics follow NATTEN 0.21 (*Generalized Neighborhood Attention*, Hassani et al. 2025): per spatial axis an
extent ``L``, a ``kernel_size`` ``k``, a ``stride`` ``s``, a ``dilation`` ``d`` and an ``is_causal`` flag.

For a query coordinate ``x``: ``r = x mod d`` picks the dilation group (sub-lattice) and ``x' = x // d`` is the
position on it; the sub-lattice has ``L_r = L // d + [r < L mod d]`` points.

* non-causal: the stride group's leader ``l = min((x' // s)·s + s // 2, L_r - 1)`` is centred, then the window
  is clamped inside the sub-lattice (it shifts inward at borders, it is never zero-padded):
  ``c = clamp(l, k // 2, L_r - 1 - (k // 2 + k % 2 - 1))``, keys ``u ∈ [c - k // 2, c - k // 2 + k)``.
* causal: ``l = min((x' // s)·s + s - 1, L_r - 1)``; keys ``u ∈ [max(0, l - k + 1), x']``.

Key coordinates are ``r + d·u``. The neighborhood of a multi-dimensional query is the Cartesian product of its
per-axis neighborhoods, so every backend works from the per-axis tables built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .problem import normalize_spatial_shape, normalize_window

__all__ = ["AxisWindows", "axis_windows", "combine_axes", "neighborhood_mask", "neighborhood_rel_index"]


@dataclass(frozen=True)
class AxisWindows:
    """Per-axis neighborhoods: query ``x`` attends to key coordinates ``start[x] + dilation·j``, ``j < count[x]``.

    ``rel_start[x]`` is the relative-position index of the first key, ``(u_key - x') + (kernel_size - 1)`` in
    sub-lattice units (NAT's *key − query* convention); the j-th key has index ``rel_start[x] + j``.
    """

    start: torch.Tensor  # int64 [L]
    count: torch.Tensor  # int64 [L]
    rel_start: torch.Tensor  # int64 [L]
    extent: int
    kernel_size: int
    dilation: int

    def key_mask(self) -> torch.Tensor:
        """Boolean [query, key] mask along this axis."""
        keys = torch.arange(self.extent)
        offset = keys[None, :] - self.start[:, None]
        return (offset >= 0) & (offset % self.dilation == 0) & (offset // self.dilation < self.count[:, None])

    def rel_index(self) -> torch.Tensor:
        """int64 [query, key] relative-position index (valid where ``key_mask`` is true)."""
        keys = torch.arange(self.extent)
        return self.rel_start[:, None] + (keys[None, :] - self.start[:, None]).div(self.dilation, rounding_mode="floor")


@lru_cache(maxsize=512)
def axis_windows(extent: int, kernel_size: int, stride: int, dilation: int, is_causal: bool) -> AxisWindows:
    """The neighborhood of every query coordinate along one axis (see the module docstring)."""
    x = torch.arange(extent)
    r = x % dilation
    xs = x // dilation
    sub_len = extent // dilation + (r < extent % dilation).long()
    if is_causal:
        leader = torch.minimum((xs // stride) * stride + stride - 1, sub_len - 1)
        first = (leader - kernel_size + 1).clamp(min=0)
        count = xs - first + 1
    else:
        left = kernel_size // 2
        right = kernel_size // 2 + kernel_size % 2 - 1
        leader = torch.minimum((xs // stride) * stride + stride // 2, sub_len - 1)
        centre = torch.maximum(torch.minimum(leader, sub_len - 1 - right), torch.full_like(leader, left))
        first = centre - left
        count = torch.full_like(x, kernel_size)
    return AxisWindows(
        start=r + dilation * first,
        count=count,
        rel_start=first - xs + kernel_size - 1,
        extent=extent,
        kernel_size=kernel_size,
        dilation=dilation,
    )


def _axes(spatial_shape, kernel_size, stride, dilation, is_causal) -> list[AxisWindows]:
    shape = normalize_spatial_shape(spatial_shape)
    window = normalize_window(shape, kernel_size, stride, dilation, is_causal, min_kernel_size=1)
    return [axis_windows(*args) for args in zip(shape, *window)]


def combine_axes(per_axis: Sequence[torch.Tensor], combine) -> torch.Tensor:
    """Combine per-axis tensors of one rank (e.g. ``[L_a, L_a]`` masks) into one tensor whose every dim enumerates
    the per-axis dims row-major (e.g. ``[N, N]`` over flattened tokens): ``combine(outer, inner)`` broadcasts."""
    out = per_axis[0]
    for m in per_axis[1:]:
        outer = out.reshape([x for size in out.shape for x in (size, 1)])
        inner = m.reshape([x for size in m.shape for x in (1, size)])
        out = combine(outer, inner).reshape([a * b for a, b in zip(out.shape, m.shape)])
    return out


def neighborhood_mask(
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> torch.Tensor:
    """The exact boolean ``[query, key]`` mask of neighborhood attention over row-major flattened tokens."""
    return combine_axes(
        [a.key_mask() for a in _axes(spatial_shape, kernel_size, stride, dilation, is_causal)], torch.logical_and
    )


def neighborhood_rel_index(
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> torch.Tensor:
    """``[query, key]`` flat index into a ``[*(2k-1)]`` relative-position table (NAT, key − query); −1 off-mask."""
    axes = _axes(spatial_shape, kernel_size, stride, dilation, is_causal)
    mask = combine_axes([a.key_mask() for a in axes], torch.logical_and)
    index = axes[0].rel_index()
    for a in axes[1:]:  # row-major over axes: earlier axes are scaled by this axis' table size
        size = 2 * a.kernel_size - 1
        index = combine_axes([index, a.rel_index()], lambda outer, inner, size=size: outer * size + inner)
    return torch.where(mask, index, torch.full_like(index, -1))
