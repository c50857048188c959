"""PVT spatial-reduction attention (SRA): every query attends to a spatially reduced set of keys."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, merge_heads, resolve_heads
from .registry import register_mechanism


@register_mechanism(
    "spatial_reduction",
    family="local",
    paper="Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions (PVT / PVTv2)",
    year=2021,
    complexity="quadratic",
    reference="timm.models.pvt_v2.Attention",
    test_kwargs={"num_heads": 2, "sr_ratio": 2},
    test_size=(8, 8),
    size_args={"sr_ratio": "ratio", "pool_size": "extent"},
)
class SpatialReductionAttention(Mechanism):
    """Spatial-reduction attention from PVT (Wang et al., 2021) and its linear variant from PVTv2 (2022).

    Queries from all tokens; keys and values from the map reduced by a ``sr_ratio``×``sr_ratio`` stride-``sr_ratio``
    convolution + LayerNorm (⌈H/R⌉·⌈W/R⌉ keys, R = 1 is plain MHSA). ``linear=True`` (PVTv2-Li): keys from
    GELU(LN(Conv1×1(AdaptiveAvgPool₇(x)))), 49 keys at any resolution.

    Sizes that are not a multiple of ``sr_ratio``: ``mask_padding=True`` zero-pads the map bottom/right before the
    reduction, so the border tokens reach the keys (the padded zeros add nothing to the convolution); with
    ``mask_padding=False`` the strided convolution drops the last ``H mod R`` rows and ``W mod R`` columns, as PVT's
    and timm's code do — those tokens are then seen by no query.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 8,
        linear: bool = False,
        pool_size: int = 7,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.sr_ratio = check_int("sr_ratio", sr_ratio)
        self.pool_size = check_int("pool_size", pool_size)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, default_head_dim=64)
        self.linear = linear
        self.mask_padding = mask_padding
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        if linear:
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
            self.norm = nn.LayerNorm(dim)
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = self.norm = None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` → the ``(B, h, w, C)`` map keys and values are computed from."""
        if self.sr is None:
            return x
        x = x.permute(0, 3, 1, 2)
        if self.linear:
            reduced = self.norm(self.sr(F.adaptive_avg_pool2d(x, self.pool_size)).permute(0, 2, 3, 1))
            return F.gelu(reduced)
        if self.mask_padding:
            x = F.pad(x, (0, -x.shape[-1] % self.sr_ratio, 0, -x.shape[-2] % self.sr_ratio))
        return self.norm(self.sr(x).permute(0, 2, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        if not (self.linear or self.mask_padding) and min(spatial) < self.sr_ratio:
            raise ValueError(f"sr_ratio={self.sr_ratio} needs H, W >= {self.sr_ratio}, got x spatial shape {spatial}")
        q = rearrange(self.q(x), "b y x (h d) -> b y x h d", h=self.num_heads)
        k, v = rearrange(self.kv(self.reduce(x)), "b y x (two h d) -> two b y x h d", two=2, h=self.num_heads)
        return self.proj_drop(
            self.proj(merge_heads(attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)))
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}, "
            f"mask_padding={self.mask_padding}"
        )
