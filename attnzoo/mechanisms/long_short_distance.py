"""CrossFormer long / short distance attention (LSDA) with the dynamic position bias (DPB)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import neighborhood_attention
from ._base import (
    Mechanism,
    check_choice,
    check_int,
    merge_heads,
    reject_attn_drop,
    renamed_kwargs,
    resolve_heads,
    split_qkv,
)
from ._windows import flip_table, pad_to_multiple
from .registry import register_mechanism

DISTANCES = ("short", "long")


class DynamicPosBias(nn.Module):
    """CrossFormer's DPB: an MLP from a relative offset (Δy, Δx) to one bias per head (non-residual form).

    ``Linear(2→D) → [LN → ReLU → Linear(D→D)]×2 → LN → ReLU → Linear(D→heads)``.
    """

    def __init__(self, pos_dim: int, num_heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))

    def table(self, window_size: int) -> torch.Tensor:
        """``[heads, 2G-1, 2G-1]`` bias indexed by the **query − key** offset in group coordinates (+ G − 1)."""
        weight = self.pos_proj.weight
        axis = torch.arange(1 - window_size, window_size, device=weight.device, dtype=weight.dtype)
        offsets = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)  # [2G-1, 2G-1, 2]
        return self(offsets).permute(2, 0, 1)


@register_mechanism(
    "long_short_distance",
    family="local",
    receptive_field="local",
    paper="CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention",
    year=2021,
    complexity="N·k",
    reference="cheerss/CrossFormer models/crossformer.py::Attention + DynamicPosBias (official; no pip package)",
    test_kwargs={"window_size": 4, "num_heads": 2, "distance": "long"},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class LongShortDistanceAttention(Mechanism):
    """CrossFormer short-distance (SDA) / long-distance (LDA) attention with dynamic position bias (Wang et al., 2021).

    ``distance='short'``: MHSA inside groups of G×G adjacent tokens (non-overlapping windows, G = ``window_size``).
    ``distance='long'``: MHSA inside groups of G×G tokens sampled at interval I = H/G (a dilated grid). Both add the
    DPB bias ``MLP(Δy, Δx)``, Δ = query − key in group coordinates, so no parameter depends on G. Sizes that are not a
    multiple of G (SDA) or of G·I with I = ⌈H/G⌉ (LDA) are zero-padded bottom/right and the padded keys masked
    (``mask_padding``); if ``min(H, W) <= window_size`` the whole map is one SDA group of size min(H, W), as in
    CrossFormer.
    """

    @renamed_kwargs(group_size="window_size", mode="distance")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 7,
        distance: str = "short",
        dpb: bool = True,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.window_size = check_int("window_size", window_size, 2)
        self.distance = check_choice("distance", distance, DISTANCES)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.mask_padding = mask_padding
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.pos = DynamicPosBias(max(1, dim // 16), self.num_heads) if dpb else None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def geometry(self, spatial: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """``(G, interval)`` used for a ``(H, W)`` map; interval (1, 1) means short-distance groups."""
        height, width = spatial
        if min(height, width) <= self.window_size:
            group = min(height, width)
            if group < 2:
                raise ValueError(f"long_short_distance needs H, W >= 2, got x spatial shape {spatial}")
            return group, (1, 1)
        if self.distance == "short":
            return self.window_size, (1, 1)
        return self.window_size, (math.ceil(height / self.window_size), math.ceil(width / self.window_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        group, interval = self.geometry(spatial)
        padding = pad_to_multiple(spatial, [group * i for i in interval])
        q, k, v = split_qkv(self.qkv(padding.pad(x)), self.num_heads)
        rpb = None if self.pos is None else flip_table(self.pos.table(group), 2).to(q.dtype)
        key_bias = padding.key_bias(q.dtype, q.device) if self.mask_padding else None
        out = neighborhood_attention(
            q, k, v, kernel_size=group, stride=group, dilation=interval, rel_pos_bias=rpb, key_bias=key_bias
        )
        out = padding.crop(merge_heads(out))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, distance={self.distance!r}, "
            f"dpb={self.pos is not None}, mask_padding={self.mask_padding}"
        )
