"""VOLO outlook attention: each location predicts the weights that aggregate its K×K neighbourhood."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ._base import Mechanism, check_int, resolve_heads
from .registry import register_mechanism


@register_mechanism(
    "outlook",
    family="local",
    receptive_field="local",
    paper="VOLO: Vision Outlooker for Visual Recognition",
    year=2021,
    complexity="N·k",
    reference="timm.models.volo.OutlookAttention",
    test_kwargs={"num_heads": 2, "kernel_size": 3, "padding": 1, "stride": 1},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class OutlookAttention(Mechanism):
    """Outlook attention from VOLO (Yuan et al., 2021): dense local aggregation with generated weights, no q·k.

    At every location i (every ``stride``-th, weights from the ``stride``-average-pooled input), a linear layer
    predicts per head a K²×K² matrix A_i (softmax over the last axis, logits × head_dim^-½) that maps the K×K
    neighbourhood of values (zero padded by ``padding``) to new values for those K² positions; overlapping
    outputs are summed back (fold) and projected.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.padding = check_int("padding", padding, 0)
        self.stride = check_int("stride", stride)
        if self.padding >= self.kernel_size:
            raise ValueError(f"padding={padding} must be < kernel_size={kernel_size}")
        self.scale = self.head_dim**-0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, self.kernel_size**4 * self.num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check_grid(self, spatial: tuple[int, int]) -> None:
        """Raise unless the unfold grid (outlook locations) matches the pooled weight grid along each axis."""
        for axis, extent in enumerate(spatial):
            pooled = math.ceil(extent / self.stride)
            unfolded = (extent + 2 * self.padding - self.kernel_size) // self.stride + 1
            if unfolded != pooled:
                raise ValueError(
                    f"kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride} give {unfolded} "
                    f"windows along axis {axis} of extent {extent}, but ceil(extent/stride)={pooled} weight sets"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        self._check_grid(spatial)
        kk = self.kernel_size**2
        v = self.v(x).permute(0, 3, 1, 2)  # B, C, H, W
        v = F.unfold(v, self.kernel_size, padding=self.padding, stride=self.stride)
        v = rearrange(v, "b (h d k) n -> b h n k d", h=self.num_heads, k=kk)
        pooled = x
        if self.stride > 1:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.stride, self.stride, ceil_mode=True).permute(0, 2, 3, 1)
        weights = rearrange(self.attn(pooled), "b y x (h i j) -> b h (y x) i j", h=self.num_heads, i=kk, j=kk)
        weights = self.attn_drop((weights * self.scale).softmax(dim=-1))
        out = rearrange(weights @ v, "b h n k d -> b (h d k) n")
        out = F.fold(out, spatial, self.kernel_size, padding=self.padding, stride=self.stride)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, padding={self.padding}, "
            f"stride={self.stride}"
        )
