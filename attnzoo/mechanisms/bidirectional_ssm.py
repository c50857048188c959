"""Vision Mamba's bidirectional Mamba block: a forward and a backward selective scan over the flattened tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int, flatten_tokens
from ._ssm import RouteScan, dt_rank_for, inner_width, route_orders
from .registry import register_mechanism

__all__ = ["BidirectionalSSM"]


@register_mechanism(
    "bidirectional_ssm",
    family="state-space",
    paper="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
    year=2024,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="hustvl/Vim mamba-1p1p1/mamba_ssm/modules/mamba_simple.py Mamba (bimamba_type='v2', if_devide_out=True)",
    is_attention=False,
    note=(
        "Vim's bimamba v2: one in_proj to (x, z); per direction its own causal depthwise conv1d (d_conv=4), x_proj, "
        "dt_proj, A_log and D; the backward direction runs on the reversed token order (its conv is causal in that "
        "order); out = out_proj((y_fwd + y_bwd) / 2 · silu(z)). Tokens are the row-major flattened grid; Vim's "
        "middle class token belongs to the model, not the mixer."
    ),
    test_kwargs={"chunk_size": 5},
    test_size=(12,),
)
class BidirectionalSSM(Mechanism):
    """Bidirectional Mamba (Zhu et al., "Vision Mamba", 2024) over the row-major flattened tokens.

    ``x, z = in_proj(x)``; for each direction d ∈ {forward, backward}: ``y_d = S6_d(SiLU(conv1d_d(x)))`` scanned in
    raster order or its reverse (``attnzoo.ops.selective_scan``); ``out = out_proj(silu(z) · (y_fwd + y_bwd) / 2)``.

    Args:
        dim: channels in/out.
        d_state: SSM state size per channel.
        ssm_ratio: inner width ``= ssm_ratio · dim``.
        dt_rank: rank of the Δ projection (None: ``ceil(dim / 16)``).
        d_conv: kernel of the causal depthwise conv1d of each direction.
        chunk_size: chunk length of the chunkwise scan.
        proj_drop: dropout on the output.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        d_conv: int = 4,
        chunk_size: int = 64,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        check_int("d_state", d_state)
        self.d_conv = check_int("d_conv", d_conv)
        check_int("chunk_size", chunk_size)
        inner = inner_width(dim, ssm_ratio)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2, inner, 1, d_conv))  # [direction, channel, 1, tap]
        nn.init.uniform_(self.conv_weight, -(d_conv**-0.5), d_conv**-0.5)
        self.conv_bias = nn.Parameter(torch.zeros(2, inner))
        self.scan = RouteScan(
            inner,
            2,
            d_state=d_state,
            dt_rank=dt_rank_for(dim) if dt_rank is None else check_int("dt_rank", dt_rank),
            shared_input=True,
            chunk_size=chunk_size,
        )
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def directional_conv(self, u: torch.Tensor) -> torch.Tensor:
        """``u [B, L, C]`` → ``[B, L, 2, C]``: the forward conv is causal in raster order, the backward one in the
        reversed order (taps reach towards later tokens)."""
        channels_first = u.transpose(1, 2)
        taps = self.d_conv - 1
        weight, bias = self.conv_weight.to(u.dtype), self.conv_bias.to(u.dtype)
        forward = F.conv1d(F.pad(channels_first, (taps, 0)), weight[0], bias[0], groups=u.shape[-1])
        backward = F.conv1d(F.pad(channels_first, (0, taps)), weight[1].flip(-1), bias[1], groups=u.shape[-1])
        return torch.stack([forward, backward], dim=1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        u, z = self.in_proj(tokens).chunk(2, dim=-1)
        u = F.silu(self.directional_conv(u))
        orders = route_orders(("row", "row_reversed"), 1, tokens.shape[1])
        y = self.scan(u, orders).unflatten(2, (2, -1)).sum(2) / 2
        y = self.out_proj(y * F.silu(z))
        return self.proj_drop(y).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.scan.d_state}, d_conv={self.d_conv}"
