"""MaxViT multi-axis attention: block (local windows) and grid (dilated, sparse global) attention."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, check_choice, merge_heads, reject_attn_drop, renamed_kwargs, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism

PARTITION_TYPES = ("block", "grid")


@register_mechanism(
    "multi_axis",
    family="local",
    receptive_field="local",
    paper="MaxViT: Multi-Axis Vision Transformer",
    year=2022,
    native_rank=2,
    complexity="N·k",
    reference="timm.models.maxxvit.AttentionCl + window_partition / grid_partition (RelPosBiasTf)",
    test_kwargs={"window_size": 4, "num_heads": 2, "partition_type": "grid"},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class MultiAxisAttention(Mechanism):
    """MaxViT block or grid attention (Tu et al., MaxViT 2022) with a relative position bias.

    ``partition_type='block'``: MHSA inside contiguous P×P windows. ``'grid'``: MHSA among the G×G tokens spaced
    H/G (W/G) apart, i.e. neighborhood attention with kernel G and dilation H/G; offsets are in grid units. The
    bias table ``[heads, 2P-1, 2P-1]`` is indexed by key − query (MaxViT's TF layout, timm ``RelPosBiasTf``).
    Extents that are not multiples of P are zero-padded at the end and the padded keys masked.
    """

    @renamed_kwargs(partition_size="window_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        partition_type: str = "block",
        window_size: int | Sequence[int] = 7,
        rel_pos_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        self.partition_type = check_choice("partition_type", partition_type, PARTITION_TYPES)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size = normalize_axis_arg("window_size", window_size, 2, minimum=2)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            shape = (self.num_heads, *(2 * p - 1 for p in self.window_size))
            self.relative_position_bias_table = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        size = self.window_size
        padding = pad_to_multiple(spatial, size)
        x = padding.pad(x)
        if self.partition_type == "block":
            dilation = (1, 1)
        else:  # one group = one sub-lattice of stride extent / G
            dilation = tuple(extent // p for extent, p in zip(padding.padded_shape, size))
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        table = self.relative_position_bias_table
        out = neighborhood_attention(
            q,
            k,
            v,
            size,
            size,
            dilation,
            rel_pos_bias=None if table is None else table.to(q.dtype),
            key_bias=padding.key_bias(q.dtype, q.device),
            backend=self.backend,
        )
        out = padding.crop(out)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, partition_type={self.partition_type!r}, "
            f"window_size={self.window_size}, rel_pos_bias={self.relative_position_bias_table is not None}"
        )
