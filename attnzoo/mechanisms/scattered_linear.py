"""ScatterFormer's scattered linear attention: linear attention inside windows, one state per window."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_int, check_positive, cpu_blocks, merge_heads, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism

__all__ = ["ScatteredLinearAttention", "window_linear_attention"]


def window_linear_attention(q, k, v, window_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention inside ``window_size²`` windows: ``o_i = φq_i·S_w / (φq_i·z_w + eps)`` for the window ``w`` of
    token ``i``, with ``S_w = Σ_{j∈w} φk_j v_jᵀ`` and ``z_w = Σ_{j∈w} φk_j``.

    ``q, k [B, H, W, heads, d]`` (non-negative features), ``v [B, H, W, heads, e]``. Edge windows are smaller: the
    grid is zero-padded to whole windows, and a zero key adds nothing to ``S_w`` or ``z_w``, so padding changes no
    real token's output. Per window ``S_w`` and ``φq·S_w`` are batched matmuls, O(N·d·e) in all. Half precision is
    computed in float32.
    """
    dtype = q.dtype
    ct = compute_dtype(dtype)
    height, width = q.shape[1:3]
    padding = pad_to_multiple((height, width), (window_size, window_size))
    q, k, v = (
        rearrange(padding.pad(t.to(ct)), "b (ny wy) (nx wx) h d -> b ny nx h (wy wx) d", wy=window_size, wx=window_size)
        for t in (q, k, v)
    )
    numerator = q @ (k.transpose(-1, -2) @ v)
    normaliser = q @ k.sum(-2).unsqueeze(-1) + eps
    out = rearrange(numerator / normaliser, "b ny nx h (wy wx) e -> b (ny wy) (nx wx) h e", wy=window_size)
    return padding.crop(out).to(dtype)


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
        "(on an image grid: window_size² windows, smaller at the borders); per window one linear-attention state "
        "Σφ(k)vᵀ and normaliser Σφ(k), φ = elu + 1, computed as batched matmuls over zero-padded windows (a padded "
        "key is zero, so it adds nothing and every window holds only its real tokens). ScatterFormer's "
        "cross-window interaction module and alternating window shifts live outside this single mixer."
    ),
    test_kwargs={"num_heads": 2, "window_size": 3},
    test_size=(7, 8),
    size_args={"window_size": "extent"},
)
class ScatteredLinearAttention(Mechanism):
    """Scattered linear attention (He et al., "ScatterFormer", ECCV 2024): linear attention within windows.

    Each token attends (with the elu + 1 kernel) to the tokens of its own window; border windows hold fewer tokens.

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
        self.eps = check_positive("eps", eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        # Windows never straddle bands of whole window rows, so each band is mixed on its own; bands sized so their
        # qkv activations fit a CPU cache keep every intermediate in cache.
        row_bytes = x.shape[0] * width * 3 * self.dim * x.element_size()
        bands = [self.mix(x[:, rows]) for rows in cpu_blocks(height, row_bytes, x.device, self.window_size)]
        return bands[0] if len(bands) == 1 else torch.cat(bands, dim=1)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer on ``x [B, H, W, dim]`` whose windows start at row and column 0."""
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = window_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, self.window_size, self.eps)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
