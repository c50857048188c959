"""Neighborhood attention: NA (NAT), DiNA (dilated) and GNA (strided, causal)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from .registry import register_mechanism


@register_mechanism(
    "neighborhood",
    family="local",
    receptive_field="local",
    paper="Neighborhood Attention Transformer / Dilated Neighborhood Attention Transformer / Generalized Neighborhood Attention",
    year=2022,
    native_rank=2,
    complexity="N·k",
    reference="natten.NeighborhoodAttention2D (natten 0.21.7); natten.functional.na2d",
    test_kwargs={"kernel_size": 3, "num_heads": 2},
    test_size=(6, 7),
    size_args={"kernel_size": "span"},
)
class NeighborhoodAttention(Mechanism):
    """Neighborhood attention (Hassani et al., NAT 2022; DiNAT 2022; GNA 2025) on 1-, 2- or 3-D token grids.

    Each query attends to the ``kernel_size`` window around it (clamped inside the canvas; ``stride`` groups share
    a window, ``dilation`` attends on a sparse lattice, ``is_causal`` per axis). ``rel_pos_bias=True`` adds NAT's
    learned relative position bias (key − query). Input ``(B, *spatial, C)`` with ``rank`` spatial axes (1, 2 or
    3; default 2).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        kernel_size: int | Sequence[int] = 7,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        is_causal: bool | Sequence[bool] = False,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, rank)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.kernel_size = normalize_axis_arg("kernel_size", kernel_size, rank, minimum=2)
        self.stride = normalize_axis_arg("stride", stride, rank, minimum=1)
        self.dilation = normalize_axis_arg("dilation", dilation, rank, minimum=1)
        self.is_causal = normalize_axis_arg("is_causal", is_causal, rank, kind=bool)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(self.num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        rpb = None if self.rpb is None else self.rpb.to(q.dtype)
        out = neighborhood_attention(
            q,
            k,
            v,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.is_causal,
            rel_pos_bias=rpb,
            backend=self.backend,
        )
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}"
        )
