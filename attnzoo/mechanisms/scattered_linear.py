"""ScatterFormer's scattered linear attention: linear attention inside variable-length windows via segment sums."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import compute_dtype
from ._base import (
    Mechanism,
    cached_table,
    check_int,
    check_positive,
    flatten_tokens,
    merge_heads,
    resolve_heads,
    split_qkv,
)
from .registry import register_mechanism

__all__ = ["ScatteredLinearAttention", "segment_linear_attention", "window_segments"]


@lru_cache(maxsize=64)
def window_segments(height: int, width: int, window_size: int) -> tuple[torch.Tensor, int]:
    """Window id of every row-major token of an ``H×W`` grid cut into ``window_size²`` windows (edge windows are
    smaller: no padding), and the number of windows."""
    rows = torch.arange(height) // window_size
    cols = torch.arange(width) // window_size
    per_row = -(-width // window_size)
    ids = (rows[:, None] * per_row + cols[None, :]).reshape(-1)
    return ids, int(-(-height // window_size) * per_row)


def segment_linear_attention(q, k, v, segments: torch.Tensor, num_segments: int, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention restricted to segments: ``o_i = φq_i·S_{s(i)} / (φq_i·z_{s(i)} + eps)``.

    ``q, k [B, N, heads, d]`` (non-negative features), ``v [B, N, heads, e]``, ``segments [N]`` (segment of every
    token, any order, any sizes). ``S_s = Σ_{j∈s} k_j v_jᵀ`` and ``z_s = Σ_{j∈s} k_j`` are scatter-added (segment
    sums), so the cost is O(N·d·e) whatever the segment sizes. Half precision is computed in float32.
    """
    dtype = q.dtype
    ct = compute_dtype(dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    b, _, h, d = k.shape
    outer = torch.einsum("bnhd,bnhe->bnhde", k, v)
    states = outer.new_zeros(b, num_segments, h, d, v.shape[-1]).index_add(1, segments, outer)
    totals = k.new_zeros(b, num_segments, h, d).index_add(1, segments, k)
    numerator = torch.einsum("bnhd,bnhde->bnhe", q, states[:, segments])
    normaliser = torch.einsum("bnhd,bnhd->bnh", q, totals[:, segments]) + eps
    return (numerator / normaliser.unsqueeze(-1)).to(dtype)


@register_mechanism(
    "scattered_linear",
    family="linear",
    paper="ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="paper equations and text (no official code read; see note)",
    receptive_field="local",
    note=(
        "From the paper's description (no official code read): tokens are grouped into windows of variable length "
        "(on an image grid: window_size² windows, smaller at the borders, no padding); per window the linear "
        "attention state Σφ(k)vᵀ and normaliser Σφ(k) are segment sums (index_add), φ = elu + 1. ScatterFormer's "
        "cross-window interaction module and alternating window shifts live outside this single mixer."
    ),
    test_kwargs={"num_heads": 2, "window_size": 3},
    test_size=(7, 8),
)
class ScatteredLinearAttention(Mechanism):
    """Scattered linear attention (He et al., "ScatterFormer", ECCV 2024): windowed linear attention by segment sums.

    Each token attends (with the elu + 1 kernel) to the tokens of its own window; windows may hold any number of
    tokens, and no padding or per-window loop is needed.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``).
        window_size: side of the square windows.
        eps: added to the normaliser.
        qkv_bias: bias of the qkv projection.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        window_size: int = 7,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.window_size = check_int("window_size", window_size)
        check_positive("eps", eps)
        self.eps = float(eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        if x.numel() == 0:  # an empty batch or grid has nothing to mix
            return x.new_zeros(x.shape)
        segments, count = cached_table(window_segments, height, width, self.window_size)
        q, k, v = split_qkv(self.qkv(flatten_tokens(x)), self.num_heads)
        out = segment_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, segments.to(x.device), count, self.eps)
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
