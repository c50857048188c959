"""Shared pieces of the selective-scan mechanisms: 2-D scan routes and Mamba's per-route scan parameters.

Every scan goes through ``attnzoo.ops.selective_scan``; this file only builds token orders and holds the
parameters (``x_proj``, ``dt_proj``, ``A_log``, ``D``) that turn a token sequence into the op's ``Δ, A, B, C, D``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import compute_dtype, selective_scan
from ._base import cached_table, check_choice, check_positive

__all__ = ["ROUTES", "route_orders", "check_routes", "RouteScan", "dt_rank_for", "inner_width"]

ROUTES = ("row", "column", "row_reversed", "column_reversed", "row_snake", "column_snake")


@lru_cache(maxsize=64)
def _route_order(route: str, height: int, width: int) -> torch.Tensor:
    grid = torch.arange(height * width).reshape(height, width)
    if route.startswith("column"):
        grid = grid.t()
    if route.endswith("snake"):
        grid = grid.clone()
        grid[1::2] = grid[1::2].flip(-1)
    order = grid.reshape(-1)
    return order.flip(0) if route.endswith("reversed") else order


def route_orders(routes: tuple[str, ...], height: int, width: int) -> torch.Tensor:
    """``[len(routes), H·W]`` token permutations of a row-major ``H×W`` grid, one per named route.

    ``row``: raster order; ``column``: column-major; ``*_reversed``: the same, last token first; ``*_snake``:
    boustrophedon (every other row / column reversed).
    """
    return torch.stack([cached_table(_route_order, route, height, width) for route in routes])


def inner_width(dim: int, ssm_ratio: float) -> int:
    """Mamba's expanded width ``int(ssm_ratio · dim)``, at least one channel (ValueError naming ``ssm_ratio``)."""
    inner = int(check_positive("ssm_ratio", ssm_ratio) * dim)
    if inner < 1:
        raise ValueError(
            f"ssm_ratio={ssm_ratio!r} gives int(ssm_ratio·dim) = 0 channels for dim={dim}; it must be >= 1"
        )
    return inner


def dt_rank_for(dim: int) -> int:
    """Mamba's default ``dt_rank = ceil(dim / 16)``."""
    return math.ceil(dim / 16)


class RouteScan(nn.Module):
    """Selective-scan parameters for ``routes`` scan routes over ``channels`` channels (Mamba / VMamba S6).

    ``shared_input=True`` (VMamba's cross-scan): every route scans all ``channels`` with its own parameters; the
    routes' outputs are concatenated (the caller sums them). ``shared_input=False`` (multi-head scan): the channels are split into ``routes``
    equal groups, group ``r`` scans along route ``r``; outputs are concatenated.

    Args:
        channels: input channels of the scan.
        routes: number of scan routes (parameter sets).
        d_state: SSM state size N per channel.
        dt_rank: rank of the low-rank Δ projection.
        shared_input: see above.
        chunk_size: chunk length of the chunkwise scan.
    """

    def __init__(
        self,
        channels: int,
        routes: int,
        *,
        d_state: int,
        dt_rank: int,
        shared_input: bool,
        chunk_size: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if not shared_input and channels % routes:
            raise ValueError(f"channels={channels} must be divisible by the number of routes={routes}")
        self.routes, self.d_state, self.dt_rank, self.shared_input = routes, d_state, dt_rank, shared_input
        self.chunk_size = chunk_size
        width = channels if shared_input else channels // routes  # channels each route scans
        self.route_width = width
        self.x_proj = nn.Parameter(torch.empty(routes, dt_rank + 2 * d_state, width))
        nn.init.uniform_(self.x_proj, -(width**-0.5), width**-0.5)
        self.dt_proj = nn.Parameter(torch.empty(routes, width, dt_rank))
        nn.init.uniform_(self.dt_proj, -(dt_rank**-0.5), dt_rank**-0.5)
        # Mamba's Δ initialisation: softplus(dt_bias) log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(routes * width) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(routes * width, 1)
        )
        self.D = nn.Parameter(torch.ones(routes * width))

    def forward(self, tokens: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, channels]`` (or, with ``shared_input``, one input per route ``[B, L, routes, channels]``)
        and ``orders [routes, L]`` → ``[B, L, routes·channels]`` (shared input: route ``r``'s output in channels
        ``r·C..(r+1)·C``) or ``[B, L, channels]`` (split input)."""
        b, length = tokens.shape[:2]
        if tokens.dim() == 4:  # one input per route already: [B, L, routes, channels]
            per_route = tokens
        elif self.shared_input:
            per_route = tokens.unsqueeze(2).expand(b, length, self.routes, self.route_width)
        else:
            per_route = tokens.unflatten(2, (self.routes, self.route_width))
        projected = torch.einsum("blrc,rkc->blrk", per_route, self.x_proj.to(tokens.dtype))
        dt_low, B, C = projected.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.einsum("blrk,rck->blrc", dt_low, self.dt_proj.to(tokens.dtype)).flatten(2)
        ct = compute_dtype(tokens.dtype)
        delta = F.softplus(delta.to(ct) + self.dt_bias.to(ct))
        A = -torch.exp(self.A_log.to(ct))
        return selective_scan(
            per_route.flatten(2),
            delta,
            A,
            B,
            C,
            self.D.to(ct),
            order=orders.to(tokens.device),
            chunk_size=self.chunk_size,
        ).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"routes={self.routes}, d_state={self.d_state}, dt_rank={self.dt_rank}, shared_input={self.shared_input}"


def check_routes(routes) -> tuple[str, ...]:
    """A non-empty tuple of names from ``ROUTES``."""
    routes = tuple(routes) if isinstance(routes, (list, tuple)) else (routes,)
    if not routes:
        raise ValueError("routes=() must name at least one scan route")
    for route in routes:
        check_choice("routes", route, ROUTES)
    return routes
