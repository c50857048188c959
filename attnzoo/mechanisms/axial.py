"""Axial attention: multi-head self-attention along one axis (or axis subset) at a time."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_choice, check_probability, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

COMBINES = ("sequential", "sum")


def _normalize_axes(axes, rank: int) -> tuple[tuple[int, ...], ...]:
    """``None`` → one step per axis; else a sequence whose entries are an axis or a tuple of axes."""
    if axes is None:
        return tuple((a,) for a in range(rank))
    if not isinstance(axes, (list, tuple)) or not axes:
        raise TypeError(f"axes={axes!r} must be None or a non-empty sequence of axes / axis tuples")
    steps = []
    for entry in axes:
        subset = (entry,) if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if (
            not isinstance(subset, (list, tuple))
            or not subset
            or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < rank for a in subset)
            or len(set(subset)) != len(subset)
        ):
            raise ValueError(f"axes={axes!r}: entry {entry!r} must be distinct spatial axes in [0, {rank})")
        steps.append(tuple(sorted(subset)))
    return tuple(steps)


@register_mechanism(
    "axial",
    family="axial",
    paper="Axial Attention in Multidimensional Transformers / P2AT / EPIT",
    year=2019,
    native_rank=2,
    complexity="N·k",
    reference="axial_attention.AxialAttention (axial-attention 0.6.1, sum_axial_out=True ⇔ combine='sum')",
    test_kwargs={"num_heads": 2},
    test_size=(5, 6),
)
class AxialAttention(Mechanism):
    """Axial attention (Ho et al. 2019; P2AT, EPIT 2023): MHSA among tokens that share every coordinate outside an
    axis subset, one step per entry of ``axes``.

    ``axes=None`` = one step per spatial axis (in order); an entry may be a tuple of axes (EPIT's 2-axis subsets of
    a 4-D light field). Each step has its own ``qkv`` and ``proj``; ``combine='sequential'`` chains the steps
    (y = A_W(A_H(x)) in 2-D), ``'sum'`` adds the steps applied to x. Works on ``rank`` spatial axes (1 to 4).
    """

    spatial_ranks = (1, 2, 3, 4)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        axes: Sequence[int | Sequence[int]] | None = None,
        combine: str = "sequential",
        rank: int = 2,
    ) -> None:
        super().__init__(dim, rank)
        self.combine = check_choice("combine", combine, COMBINES)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.axes = _normalize_axes(axes, rank)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * inner, bias=qkv_bias) for _ in self.axes)
        self.proj = nn.ModuleList(nn.Linear(inner, dim) for _ in self.axes)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step``: MHSA along its axis subset, the other axes folded into the batch."""
        subset = self.axes[step]
        others = [a for a in range(self.rank) if a not in subset]
        order = [0, *(1 + a for a in others), *(1 + a for a in subset), self.rank + 1]
        moved = x.permute(order)
        folded_shape = moved.shape
        tokens = moved.reshape(-1, *folded_shape[len(others) + 1 : -1], self.dim)
        q, k, v = split_qkv(self.qkv[step](tokens), self.num_heads)
        out = self.proj[step](merge_heads(attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)))
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return out.reshape(folded_shape).permute(inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.combine == "sum":
            out = sum(self.attend(x, step) for step in range(len(self.axes)))
        else:
            out = x
            for step in range(len(self.axes)):
                out = self.attend(out, step)
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, axes={self.axes}, combine={self.combine!r}"
