"""PPMA: softmax attention with a 2-D polyline-path decay mask built from Mamba2-style input-dependent decays."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, cached_table, check_divisible, check_int, merge_heads, resolve_heads
from ._rotary import rotate_pairs
from .registry import register_mechanism

__all__ = ["PolylinePathMaskAttention", "polyline_path_mask"]


@lru_cache(maxsize=32)
def _raster_angles(tokens: int, head_dim: int) -> torch.Tensor:
    """PPMA's RoPE angles ``t·10000^(−linspace(0, 1, d/2))`` over the raster index t; ``[N, d/2]`` in float64."""
    theta = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float64)
    return torch.arange(tokens, dtype=torch.float64)[:, None] * theta


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` → ``[..., L, L]``: entry (a, b) sums the decays over the positions after min(a, b) up to max(a, b)."""
    total = log_decay.cumsum(-1)
    diff = total[..., :, None] - total[..., None, :]  # total[a] − total[b]
    index = torch.arange(log_decay.shape[-1], device=log_decay.device)
    return torch.where(index[:, None] >= index[None, :], diff, -diff)


def polyline_path_mask(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """PPMA's log-mask ``[B, heads, N, N]`` from per-token log decays ``alpha, beta [B, heads, H, W]``.

    For query (i, j) and key (i', j') the polyline goes along the query's row i from column j to j' (summing
    ``alpha``), then along column j' from row i to i' (summing ``beta``); positions after the start, up to and
    including the end, are summed.
    """
    b, h, height, width = alpha.shape
    along_rows = _segment_sums(alpha)  # [B, h, H(i), W(j), W(j')]
    along_cols = _segment_sums(beta.transpose(-1, -2))  # [B, h, W(j'), H(i), H(i')]
    mask = along_rows[:, :, :, :, None, :] + along_cols.permute(0, 1, 3, 4, 2)[:, :, :, None]  # [B, h, i, j, i', j']
    return mask.reshape(b, h, height * width, height * width)


@register_mechanism(
    "polyline_path_mask",
    family="global",
    paper="Polyline Path Masked Attention for Vision Transformer",
    year=2025,
    native_rank=2,
    complexity="quadratic",
    reference="zhongchenzhao/PPMA classification/models/PPMA.py MambaAttentionAllDouble, PathEmbeding2D",
    note=(
        "As the official MambaAttentionAllDouble: per head, dt_linear (head_dim → 2) on the input gives α, β; "
        "α = softplus(dt_α + dt_bias)·A, β = softplus(dt_β + dt_bias)·A with A = −exp(A_log), A_log from U(1, 1.1); "
        "log-mask M[(i,j),(i',j')] = Σα along row i between columns j and j' + Σβ along column j' between rows i "
        "and i'; attention = ½softmax(s·QKᵀ + M) + ½softmax(s·QKᵀ + Mᵀ) with 1-D RoPE over the raster index; plus a "
        "5×5 depthwise LePE of v and the output projection."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(4, 5),
    size_args={"kernel_size": "kernel"},
)
class PolylinePathMaskAttention(Mechanism):
    """Polyline path masked attention (Zhao et al., PPMA, 2025).

    Softmax attention whose weights are multiplied by a data-dependent decay ``exp(M)``: the product of Mamba2-style
    per-token decays along an L-shaped (polyline) path from query to key on the 2-D grid. The mask and its
    transpose (the path turning the other way round) are averaged over two softmaxes.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``); ``head_dim`` must be even (RoPE).
        kernel_size: depthwise LePE convolution of v.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        kernel_size: int = 5,
        proj_drop: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_divisible("head_dim", self.head_dim, "2 (rotary pairs)", 2)
        check_int("kernel_size", kernel_size, odd=True)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.lepe = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dt_linear = nn.Linear(self.head_dim, 2, bias=False)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(1, 1.1)))

    def log_decays(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log decays ``α, β [B, heads, H, W]`` (both ≤ 0)."""
        dt = self.dt_linear(x.unflatten(-1, (self.num_heads, self.head_dim)))  # [B, H, W, heads, 2]
        dt = F.softplus(dt + self.dt_bias[:, None]) * -torch.exp(self.A_log)[:, None]
        return rearrange(dt[..., 0], "b y x h -> b h y x"), rearrange(dt[..., 1], "b y x h -> b h y x")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        q, k, v = (
            rearrange(p(x), "b y x (h d) -> b (y x) h d", h=self.num_heads)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        angles = cached_table(_raster_angles, height * width, self.head_dim).to(x.device)[:, None]
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        mask = polyline_path_mask(*self.log_decays(x))
        out = 0.5 * attention(q, k, v, attn_mask=mask) + 0.5 * attention(q, k, v, attn_mask=mask.transpose(-1, -2))
        out = merge_heads(out).unflatten(1, (height, width))
        out = out + self.lepe(rearrange(v, "b (y x) h d -> b (h d) y x", y=height)).permute(0, 2, 3, 1)
        return self.proj_drop(self.out_proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
