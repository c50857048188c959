"""MHS-VM's multi-head scan: channel sub-spaces as heads, each scanning the feature map along its own 2-D route."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int
from ._ssm import RouteScan, check_routes, dt_rank_for, inner_width, route_orders
from .registry import register_mechanism

__all__ = ["MultiHeadScan"]

DEFAULT_ROUTES = ("row", "column", "row_reversed", "column_reversed")


@register_mechanism(
    "multihead_scan",
    family="state-space",
    paper="MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="paper equations and text (no official code read; see note)",
    is_attention=False,
    note=(
        "From the paper's description (no official code read): the inner channels are split into num_heads "
        "sub-spaces; head h scans its sub-space along routes[h] with its own S6 parameters (one selective_scan "
        "call, channel groups with per-group orders); heads are concatenated, LayerNorm'd, gated by SiLU(z) and "
        "projected. The paper's scan-route attention that re-weights heads is replaced by this concatenation. "
        "Default routes: VMamba's four cross routes; snake routes are available (_ssm.ROUTES)."
    ),
    test_kwargs={"chunk_size": 8},
    test_size=(5, 6),
    size_args={"kernel_size": "kernel"},
)
class MultiHeadScan(Mechanism):
    """Multi-head scan (Ji, "MHS-VM", 2024): each channel sub-space (head) scans along a different 2-D route.

    ``x, z = in_proj(x)``; ``x → DWConv → SiLU``; head h (channels ``h·d..(h+1)·d``) runs Mamba's S6 scan along
    ``routes[h]``; ``out = out_proj(LN(concat heads) · SiLU(z))``. Costs one scan of the inner width, whatever the
    number of routes (VMamba's cross scan costs one per route).

    Args:
        dim: channels in/out.
        routes: one route name per head (names from ``_ssm.ROUTES``); ``num_heads = len(routes)``.
        d_state: SSM state size per channel.
        ssm_ratio: inner width ``= ssm_ratio · dim`` (must split evenly over the heads).
        dt_rank: rank of each head's Δ projection (None: ``ceil(dim / 16)``).
        kernel_size: depthwise convolution before the scan.
        chunk_size: chunk length of the chunkwise scan.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        routes: Sequence[str] = DEFAULT_ROUTES,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        kernel_size: int = 3,
        chunk_size: int = 64,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.routes = check_routes(routes)
        check_int("d_state", d_state)
        check_int("kernel_size", kernel_size, odd=True)
        check_int("chunk_size", chunk_size)
        inner = inner_width(dim, ssm_ratio)
        if inner < len(self.routes) or inner % len(self.routes):
            raise ValueError(
                f"ssm_ratio·dim={inner} must be a positive multiple of the number of heads len(routes)={len(self.routes)}"
            )
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner)
        self.scan = RouteScan(
            inner,
            len(self.routes),
            d_state=d_state,
            dt_rank=dt_rank_for(dim) if dt_rank is None else check_int("dt_rank", dt_rank),
            shared_input=False,
            chunk_size=chunk_size,
        )
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(u.permute(0, 3, 1, 2))).flatten(2).transpose(1, 2)
        y = self.out_norm(self.scan(u, route_orders(self.routes, height, width)))
        y = y.unflatten(1, (height, width)) * F.silu(z)
        return self.proj_drop(self.out_proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, routes={self.routes}"
