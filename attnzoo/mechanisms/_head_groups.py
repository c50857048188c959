"""Neighborhood attention whose head groups have their own kernel size and dilation (one engine call)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import (
    Mechanism,
    check_divisible,
    merge_heads,
    reject_attn_drop,
    resolve_heads,
    split_qkv,
)

__all__ = ["GroupedNeighborhood"]


class GroupedNeighborhood(Mechanism):
    """Multi-head neighborhood attention with the heads split into ``len(kernel_size)`` equal groups; group g uses
    ``kernel_size[g]`` and ``dilation[g]`` (each an int or per-axis sequence). ``num_heads`` defaults to one head
    per group per 32 channels (at least one per group). Subclasses register it with their paper's defaults."""

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: Sequence,
        dilation: Sequence,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, rank)
        reject_attn_drop(attn_drop)
        if not isinstance(kernel_size, (tuple, list)) or not isinstance(dilation, (tuple, list)):
            raise TypeError(
                f"kernel_size={kernel_size!r} and dilation={dilation!r} must be sequences, one entry per group"
            )
        if len(kernel_size) != len(dilation) or not kernel_size:
            raise ValueError(
                f"kernel_size={kernel_size!r} and dilation={dilation!r} must have the same non-zero length"
            )
        groups = len(kernel_size)
        self.kernel_size = tuple(normalize_axis_arg("kernel_size", k, rank, minimum=2) for k in kernel_size)
        self.dilation = tuple(normalize_axis_arg("dilation", d, rank, minimum=1) for d in dilation)
        if num_heads is None and head_dim is None:
            num_heads = groups * max(1, dim // (32 * groups))
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_divisible("num_heads", self.num_heads, "the number of groups len(kernel_size)", groups)
        self.head_groups = (self.num_heads // groups,) * groups
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = neighborhood_attention(
            q, k, v, self.kernel_size, dilation=self.dilation, head_groups=self.head_groups, backend=self.backend
        )
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_groups={self.head_groups}, "
            f"kernel_size={self.kernel_size}, dilation={self.dilation}"
        )
