"""Swin window attention (W-MSA) and shifted window attention (SW-MSA)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention, neighborhood_attention, resolve_backend
from ._base import Mechanism, cached_table, inference_cached, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import (
    effective_shift,
    flip_table,
    offset_windows,
    pad_to_multiple,
    relative_position_index,
    window_and_shift,
)
from .registry import register_mechanism

_AXES = "xyz"


def _window_pattern(rank: int) -> tuple[str, str]:
    """einops patterns: axis a of extent n·k is split as (n k); a window is (b, n...), its tokens (k...)."""
    split = "b " + " ".join(f"(n{a} k{a})" for a in _AXES[:rank])
    windows = f"(b {' '.join('n' + a for a in _AXES[:rank])}) ({' '.join('k' + a for a in _AXES[:rank])})"
    return split, windows


@lru_cache(maxsize=64)
def _region_mask(padded_shape: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """``[windows, K, K]`` Swin region mask of a canvas rolled by −shift: 0 where query and key come from the same
    region (along a shifted axis of extent E: ``[0, E−M)``, ``[E−M, E−S)``, ``[E−S, E)``), −inf elsewhere."""
    label = torch.zeros(padded_shape, dtype=torch.long)
    for axis, (extent, m, s) in enumerate(zip(padded_shape, window, shift)):
        position = torch.arange(extent)
        along = (position >= extent - m).long() + (position >= extent - s).long() if s else torch.zeros_like(position)
        label = label * 3 + along.reshape([-1 if a == axis else 1 for a in range(len(padded_shape))])
    split, windows = _window_pattern(len(padded_shape))
    sizes = {f"k{a}": m for a, m in zip(_AXES, window)}
    label = rearrange(label[None, ..., None], f"{split} c -> {windows} c", **sizes)[..., 0]  # [windows, K]
    blocked = label[:, :, None] != label[:, None, :]
    return torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))


@register_mechanism(
    "window",
    family="local",
    receptive_field="local",
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
    year=2021,
    native_rank=2,
    complexity="N·k",
    reference="torchvision.models.swin_transformer.ShiftedWindowAttention; timm.models.swin_transformer.WindowAttention",
    test_kwargs={"window_size": 4, "shift_size": 2, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class WindowAttention(Mechanism):
    """Swin (shifted) window attention (Liu et al., Swin Transformer 2021) with a relative position bias table.

    Tokens attend inside non-overlapping ``window_size`` windows. ``shift_size`` S > 0 gives SW-MSA: Swin's
    roll by −S plus region mask is exactly a window grid offset by S without wrap-around. With ``backend="auto"``
    (and no ``attnzoo.ops.use_backend`` block) and extents that are multiples of the window it runs as Swin does
    (roll, windows, one additive mask holding the bias table and the region mask, roll back), so a shifted layer
    costs what an unshifted one costs; otherwise it runs as plain windows on a canvas padded with M − S masked tokens in front (q/k/v projected on the real tokens,
    then padded), on the chosen engine backend. Extents are zero-padded at the end to a multiple of the window
    (before the qkv projection); ``mask_padding=True`` drops those keys, ``False`` lets them act as
    keys like the official / torchvision code (pad-then-roll). Along an axis with extent <= window the shift is 0
    (torchvision's rule) and the window covers the whole (padded) axis.

    The bias table has Swin's layout ``((2M-1)^D, heads)`` indexed by query − key, so Swin checkpoints load as is
    (keys ``qkv``, ``proj``, ``relative_position_bias_table``). Input ``(B, *spatial, C)`` with ``rank`` axes.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int | Sequence[int] = 7,
        shift_size: int | Sequence[int] = 0,
        rel_pos_bias: bool = True,
        mask_padding: bool = True,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, rank)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size, self.shift_size = window_and_shift(window_size, shift_size, rank)
        self.mask_padding = bool(mask_padding)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            entries = math.prod(2 * m - 1 for m in self.window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, self.num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)

    def _key_minus_query_table(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        table = self.relative_position_bias_table.t().reshape(self.num_heads, *(2 * m - 1 for m in self.window_size))
        return flip_table(table, self.rank).to(dtype)

    def _window_mask(self, padded_shape: tuple[int, ...], shift: tuple[int, ...], dtype: torch.dtype, device):
        """``[windows, heads, K, K]`` additive mask of the rolled canvas: bias table (query − key) + region mask
        (cached while autograd is off)."""
        table = self.relative_position_bias_table

        def compute() -> torch.Tensor:
            region = cached_table(_region_mask, padded_shape, self.window_size, shift).to(device=device, dtype=dtype)
            if table is None:
                return region[:, None]
            index = cached_table(relative_position_index, self.window_size).to(device)
            return region[:, None] + table.to(dtype)[index].permute(2, 0, 1)[None]

        return inference_cached(self, "_window_mask_cache", (padded_shape, shift, dtype, device), compute, table)

    def _rolled_windows(self, x: torch.Tensor, shift: tuple[int, ...]) -> torch.Tensor:
        """SW-MSA as Swin computes it, on ``x`` whose extents are multiples of the window: ``(B, *spatial, inner)``."""
        dims = tuple(a + 1 for a, s in enumerate(shift) if s)
        x = torch.roll(x, tuple(-s for s in shift if s), dims)
        split, windows = _window_pattern(self.rank)
        sizes = {f"k{a}": m for a, m in zip(_AXES, self.window_size)}
        pattern = f"{split} (three h d) -> three {windows} h d"
        q, k, v = rearrange(self.qkv(x), pattern, three=3, h=self.num_heads, **sizes)
        mask = self._window_mask(tuple(x.shape[1:-1]), shift, q.dtype, q.device)
        mask = mask.expand(x.shape[0], *mask.shape).flatten(0, 1)  # [B·windows, heads, K, K]
        out = attention(q, k, v, attn_mask=mask)
        grid = {f"n{a}": e // m for a, e, m in zip(_AXES, x.shape[1:-1], self.window_size)}
        out = rearrange(out, f"{windows} h d -> {split} (h d)", **sizes, **grid)
        return torch.roll(out, tuple(s for s in shift if s), dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        window = self.window_size
        shift = effective_shift(self.shift_size, window, spatial)
        # official behaviour (mask_padding=False): the end padding is made of ordinary (unmasked) zero tokens
        outer = pad_to_multiple(spatial, (1,) * self.rank if self.mask_padding else window)
        if (
            resolve_backend(self.backend) == "auto"
            and any(shift)
            and all(e % m == 0 for e, m in zip(outer.padded_shape, window))
        ):
            out = self._rolled_windows(outer.pad(x), shift)
            return self.proj_drop(self.proj(outer.crop(out)))
        # shifted windows = windows on a grid offset by the shift; the offset tokens are always masked
        inner = offset_windows(outer.padded_shape, window, shift)
        # the offset tokens are masked keys and cropped queries: pad q/k/v after projecting only the real tokens
        q, k, v = (inner.pad(t) for t in split_qkv(self.qkv(outer.pad(x)), self.num_heads))
        out = neighborhood_attention(
            q,
            k,
            v,
            window,
            window,
            rel_pos_bias=self._key_minus_query_table(q.dtype),
            key_bias=inner.key_bias(q.dtype, q.device),
            backend=self.backend,
        )
        return self.proj_drop(self.proj(merge_heads(outer.crop(inner.crop(out)))))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, rel_pos_bias={self.relative_position_bias_table is not None}, "
            f"mask_padding={self.mask_padding}"
        )
