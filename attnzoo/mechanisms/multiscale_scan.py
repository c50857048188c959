"""MSVMamba's multi-scale 2-D selective scan (MS2D): one scan at full resolution, three on a half-resolution map."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int
from ._ssm import RouteScan, dt_rank_for, inner_width, route_orders
from .registry import register_mechanism

__all__ = ["MultiScaleScan"]

COARSE_ROUTES = ("row_reversed", "column", "column_reversed")


@register_mechanism(
    "multiscale_scan",
    family="state-space",
    paper="Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="YuHengsss/MSVMamba classification/models/vmamba.py SS2D (sscore_type='multiscale_4scan_12', ms_split=[1, 3])",
    is_attention=False,
    note=(
        "MSVMamba's multiscale_4scan_12 core: branch 0 = 3×3 DW conv + SiLU, one raster-order scan at full "
        "resolution (parameter set 0); branch 1 = 7×7 stride-2 DW conv + SiLU on the pre-conv features, then the "
        "reversed-row, column and reversed-column routes of the half-resolution map concatenated into ONE sequence "
        "scanned with parameter set 1 (as the official code does), LayerNorm'd, un-permuted, summed and bilinearly "
        "upsampled; y = (LN(y0) + up(LN(y1))) · SiLU(z) → out_proj. d_state=1, ssm_ratio=2 as in vssm_tiny_224_ms. "
        "The block's optional SE module (add_se) and ConvFFN are outside the token mixer and left out."
    ),
    test_kwargs={"chunk_size": 8},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class MultiScaleScan(Mechanism):
    """MS2D (Shi et al., "Multi-Scale VMamba", 2024): selective scans at two resolutions.

    A full-resolution raster scan keeps detail; three scans of a stride-2 downsampled map (reversed rows, columns,
    reversed columns, concatenated into one sequence) give long-range routes at a quarter of the tokens. All scans
    run on ``attnzoo.ops.selective_scan``.

    Args:
        dim: channels in/out.
        d_state: SSM state size per channel.
        ssm_ratio: inner width ``= ssm_ratio · dim``.
        dt_rank: rank of the Δ projection (None: ``ceil(dim / 16)``).
        kernel_size: depthwise convolution of the full-resolution branch.
        chunk_size: chunk length of the chunkwise scan.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        kernel_size: int = 3,
        chunk_size: int = 64,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        check_int("d_state", d_state)
        check_int("kernel_size", kernel_size, odd=True)
        check_int("chunk_size", chunk_size)
        inner = inner_width(dim, ssm_ratio)
        rank = dt_rank_for(dim) if dt_rank is None else check_int("dt_rank", dt_rank)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner)
        self.coarse_conv = nn.Conv2d(inner, inner, 7, stride=2, padding=3, groups=inner)
        self.fine_scan = RouteScan(inner, 1, d_state=d_state, dt_rank=rank, shared_input=True, chunk_size=chunk_size)
        self.coarse_scan = RouteScan(inner, 1, d_state=d_state, dt_rank=rank, shared_input=True, chunk_size=chunk_size)
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def concatenated_order(height: int, width: int) -> torch.Tensor:
        """The three coarse routes as one permutation of three stacked copies of the ``H×W`` tokens."""
        orders = route_orders(COARSE_ROUTES, height, width)
        return (orders + torch.arange(3)[:, None] * height * width).reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = u.permute(0, 3, 1, 2)
        fine = F.silu(self.conv(u)).flatten(2).transpose(1, 2)  # [B, H·W, C]
        y = self.out_norm(self.fine_scan(fine, route_orders(("row",), height, width)))
        coarse = F.silu(self.coarse_conv(u))
        coarse_h, coarse_w = coarse.shape[-2:]
        copies = coarse.flatten(2).transpose(1, 2).repeat(1, 3, 1)  # one copy of the tokens per route
        y_coarse = self.coarse_scan(copies, self.concatenated_order(coarse_h, coarse_w))
        y_coarse = self.out_norm(y_coarse).unflatten(1, (3, -1)).sum(1)  # normalised per route, then merged
        y_coarse = y_coarse.transpose(1, 2).unflatten(2, (coarse_h, coarse_w))
        y_coarse = F.interpolate(y_coarse, size=(height, width), mode="bilinear", align_corners=False)
        y = y.unflatten(1, (height, width)) + y_coarse.permute(0, 2, 3, 1)
        return self.proj_drop(self.out_proj(y * F.silu(z)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.fine_scan.d_state}"
