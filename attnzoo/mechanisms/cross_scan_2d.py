"""SS2D, VMamba's 2-D selective scan over four cross-scan routes."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int
from ._ssm import RouteScan, check_routes, dt_rank_for, inner_width, route_orders
from .registry import register_mechanism

__all__ = ["CrossScan2D"]

CROSS_ROUTES = ("row", "column", "row_reversed", "column_reversed")


@register_mechanism(
    "cross_scan_2d",
    family="state-space",
    paper="VMamba: Visual State Space Model",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="MzeroMiko/VMamba vmamba.py SS2D (forward_type v05_noz; vmamba_tiny_s1l8 configuration)",
    is_attention=False,
    note=(
        "SS2D as in VMamba's released v05_noz configuration (vmamba_tiny_s1l8: d_state=1, ssm_ratio=1, "
        "dt_rank=ceil(dim/16), 3×3 depthwise conv without bias, no z gate, LayerNorm on the merged scans). "
        "The four routes are VMamba's cross_scan order (row-major, column-major, both reversed); route outputs are "
        "summed at token positions (cross_merge). mamba-ssm's selective_scan_ref cannot be imported without its "
        "CUDA build (the module imports selective_scan_cuda at top level), so the scan is checked against "
        "ops.selective_scan's own recurrence and a hand-written double sum."
    ),
    test_kwargs={"chunk_size": 8},
    test_size=(5, 6),
    size_args={"kernel_size": "kernel"},
)
class CrossScan2D(Mechanism):
    """SS2D (Liu et al., "VMamba: Visual State Space Model", 2024): Mamba's selective scan along four 2-D routes.

    ``x → Linear → DWConv3×3 → SiLU → {S6 scan along each route} → Σ routes → LayerNorm → Linear``. Each route has
    its own input-dependent ``Δ, B, C`` projections and ``A, D`` (``attnzoo.ops.selective_scan``).

    Args:
        dim: channels in/out.
        d_state: SSM state size per channel (VMamba v05: 1).
        ssm_ratio: inner width ``= ssm_ratio · dim``.
        dt_rank: rank of the Δ projection (None: ``ceil(dim / 16)``).
        kernel_size: depthwise convolution kernel before the scan.
        routes: the scan routes (names from ``_ssm.ROUTES``), VMamba's four by default.
        chunk_size: chunk length of the chunkwise scan.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | None = None,
        kernel_size: int = 3,
        routes: Sequence[str] = CROSS_ROUTES,
        chunk_size: int = 64,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        check_int("d_state", d_state)
        check_int("kernel_size", kernel_size, odd=True)
        check_int("chunk_size", chunk_size)
        self.routes = check_routes(routes)
        inner = inner_width(dim, ssm_ratio)
        self.in_proj = nn.Linear(dim, inner)
        self.conv = nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner, bias=False)
        self.scan = RouteScan(
            inner,
            len(self.routes),
            d_state=d_state,
            dt_rank=dt_rank_for(dim) if dt_rank is None else check_int("dt_rank", dt_rank),
            shared_input=True,
            chunk_size=chunk_size,
        )
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        u = self.in_proj(x).permute(0, 3, 1, 2)
        u = F.silu(self.conv(u)).permute(0, 2, 3, 1).flatten(1, 2)  # [B, L, inner]
        y = self.scan(u, route_orders(self.routes, height, width))  # [B, L, routes·inner]
        y = y.unflatten(2, (len(self.routes), -1)).sum(2)
        y = self.out_proj(self.out_norm(y))
        return self.proj_drop(y).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, routes={self.routes}"
