"""HAT overlapping cross-attention (OCA): window queries attend to a larger, overlapping key window."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import neighborhood_attention
from ._base import Mechanism, check_int, check_probability, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import Padding, pad_to_multiple
from .registry import register_mechanism


def _engine_index(window: int, extended: int) -> torch.Tensor:
    """``[2M_o-1, 2M_o-1]`` index into HAT's ``(S², heads)`` table (S = M + M_o − 1) for each engine offset
    (key − query in pixels); S² (an appended zero row) where no query/key pair has that offset.

    HAT (``calculate_rpi_oca``): Δ = key coordinate in the extended window − query coordinate in its window per
    axis (**key − query**), index = ((Δy + M − M_o + 1)·S + (Δx + M − M_o + 1)) mod S², the mod being Python's
    wrap of negative indices (the map is a bijection onto the table). Δ = pixel offset + (M_o − M)/2.
    """
    side = window + extended - 1
    halo = (extended - window) // 2
    offset = torch.arange(-(extended - 1), extended)  # engine offsets
    delta = offset + halo  # key coordinate in the extended window − query coordinate in its window
    valid = (delta >= -(window - 1)) & (delta <= extended - 1)
    row = delta + window - extended + 1
    flat = (row[:, None] * side + row[None, :]) % (side * side)
    return torch.where(valid[:, None] & valid[None, :], flat, torch.full_like(flat, side * side))


@register_mechanism(
    "overlapping_cross",
    family="local",
    receptive_field="local",
    paper="HAT: Hybrid Attention Transformer for Image Restoration (Activating More Pixels in Image Super-Resolution Transformer)",
    year=2023,
    complexity="N·k",
    reference="XPixelGroup/HAT hat/archs/hat_arch.py::OCAB + HAT.calculate_rpi_oca (official; no pip package)",
    test_kwargs={"window_size": 4, "overlap_ratio": 0.5, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class OverlappingCrossAttention(Mechanism):
    """Overlapping cross-attention from HAT (Chen et al., 2023).

    Queries come from non-overlapping M×M windows; each window's keys and values come from the overlapping
    M_o×M_o window (M_o = M + ⌊overlap_ratio·M⌋) centred on it, cut from the projected k, v zero-padded by
    (M_o − M)/2 (padded keys are unmasked, k = v = 0, as in HAT). Logits get HAT's relative-position bias
    (table ``((M + M_o − 1)², heads)`` indexed by key − query, including HAT's negative-index wrap). Extents that
    are not a multiple of M are zero-padded bottom/right and those keys masked (``mask_padding``).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 16,
        overlap_ratio: float = 0.5,
        rel_pos_bias: bool = True,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        check_int("window_size", window_size, 2)
        check_probability("overlap_ratio", overlap_ratio)
        extended = window_size + int(overlap_ratio * window_size)
        if (extended - window_size) % 2:
            raise ValueError(
                f"overlap_ratio={overlap_ratio} gives an overlapping window of {extended} for window_size={window_size}; "
                f"the overlap {extended - window_size} must be even so the window stays centred"
            )
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size = window_size
        self.overlap_ratio = overlap_ratio
        self.overlap_win_size = extended
        self.mask_padding = mask_padding
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        if rel_pos_bias:
            side = window_size + extended - 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, self.num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer("engine_index", _engine_index(window_size, extended), persistent=False)
        else:
            self.register_parameter("relative_position_bias_table", None)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def engine_table(self) -> torch.Tensor | None:
        """HAT's table rearranged as the engine's ``[heads, 2M_o-1, 2M_o-1]`` key − query table."""
        if self.relative_position_bias_table is None:
            return None
        table = self.relative_position_bias_table
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
        return table[self.engine_index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        m, halo = self.window_size, (self.overlap_win_size - self.window_size) // 2
        padding = pad_to_multiple(spatial, (m, m))
        qkv = self.qkv(padding.pad(x))
        key_bias = padding.key_bias(qkv.dtype, qkv.device) if self.mask_padding else None
        # Halo of zeros around the canvas: M before (keeps query windows aligned to the stride grid), halo after.
        halo_pad = Padding(padding.padded_shape, (m if halo else 0,) * 2, (halo,) * 2)
        qkv = halo_pad.pad(qkv)
        if key_bias is not None:
            key_bias = halo_pad.pad(key_bias)
        q, k, v = split_qkv(qkv, self.num_heads)
        table = self.engine_table()
        out = neighborhood_attention(
            q,
            k,
            v,
            kernel_size=self.overlap_win_size,
            stride=m,
            rel_pos_bias=None if table is None else table.to(q.dtype),
            key_bias=key_bias,
        )
        out = padding.crop(halo_pad.crop(merge_heads(out)))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"overlap_win_size={self.overlap_win_size}, mask_padding={self.mask_padding}"
        )
