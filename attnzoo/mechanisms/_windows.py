"""Shared geometry for window-style mechanisms: zero padding with masked keys, and relative-position tables.

Window mechanisms run on ``attnzoo.ops.neighborhood_attention`` (kernel = stride = window gives non-overlapping
windows); this file holds the only padding/cropping code, so no mechanism re-implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ops import normalize_axis_arg

__all__ = [
    "Padding",
    "pad_to_multiple",
    "window_and_shift",
    "effective_shift",
    "offset_windows",
    "relative_position_index",
    "flip_table",
]


@dataclass(frozen=True)
class Padding:
    """Zero padding of the spatial axes of a channels-last tensor: ``before[a]`` and ``after[a]`` per axis."""

    spatial_shape: tuple[int, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(s + b + a for s, b, a in zip(self.spatial_shape, self.before, self.after))

    @property
    def is_empty(self) -> bool:
        return not any(self.before) and not any(self.after)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *spatial, ...)`` → ``(B, *padded, ...)`` with zeros; any number of trailing dims (channels, or
        heads and head_dim) is left alone."""
        self._check_spatial(x, self.spatial_shape, "pad", "spatial_shape")
        if self.is_empty:
            return x
        widths: list[int] = [0, 0] * (x.dim() - 1 - len(self.spatial_shape))  # trailing dims, last first
        for b, a in zip(reversed(self.before), reversed(self.after)):
            widths += [b, a]
        return F.pad(x, widths)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pad``: ``(B, *padded, ...)`` → ``(B, *spatial, ...)``."""
        self._check_spatial(x, self.padded_shape, "crop", "padded_shape")
        if self.is_empty:
            return x
        index = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(self.before, self.spatial_shape))
        return x[index]

    def _check_spatial(self, x: torch.Tensor, expected: tuple[int, ...], method: str, name: str) -> None:
        """The spatial axes of ``x`` (those right after the batch dim) must be ``expected``."""
        if tuple(x.shape[1 : 1 + len(expected)]) != expected:
            raise ValueError(
                f"Padding.{method} needs x of shape (B, *{name}, ...) with {name}={expected}, "
                f"got x.shape={tuple(x.shape)}"
            )

    def valid_mask(self, device=None) -> torch.Tensor:
        """Boolean ``padded_shape`` tensor, True on real tokens."""
        mask = torch.zeros(self.padded_shape, dtype=torch.bool, device=device)
        mask[tuple(slice(b, b + s) for b, s in zip(self.before, self.spatial_shape))] = True
        return mask

    def key_bias(self, dtype: torch.dtype, device=None) -> torch.Tensor | None:
        """``[1, *padded, 1]`` additive key bias for ``neighborhood_attention``: 0 on real tokens, -inf on padding."""
        if self.is_empty:
            return None
        bias = torch.zeros(self.padded_shape, dtype=dtype, device=device)
        bias.masked_fill_(~self.valid_mask(device), float("-inf"))
        return bias[None, ..., None]


def pad_to_multiple(
    spatial_shape: Sequence[int], multiples: Sequence[int], before: Sequence[int] | None = None
) -> Padding:
    """Padding that puts ``before[a]`` zeros first and then enough zeros at the end of each axis to reach a
    multiple of ``multiples[a]`` (bottom/right padding as Swin, HaloNet, MaxViT do)."""
    before = tuple(before) if before is not None else (0,) * len(spatial_shape)
    after = tuple((-(s + b)) % m for s, b, m in zip(spatial_shape, before, multiples))
    return Padding(tuple(int(s) for s in spatial_shape), tuple(before), after)


def window_and_shift(
    window_size: int | Sequence[int], shift_size: int | Sequence[int], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-axis window extents (>= 2) and Swin shifts (0 <= shift < window), each a ValueError naming the argument."""
    window = normalize_axis_arg("window_size", window_size, rank, minimum=2)
    shift = normalize_axis_arg("shift_size", shift_size, rank, minimum=0)
    for axis, (s, m) in enumerate(zip(shift, window)):
        if s >= m:
            raise ValueError(f"shift_size={shift_size!r} must be < window_size={m} along axis {axis}, got {s}")
    return window, shift


def effective_shift(shift: Sequence[int], window: Sequence[int], spatial_shape: Sequence[int]) -> tuple[int, ...]:
    """The shift used for an input: 0 along axes whose extent fits in one window (torchvision's rule)."""
    return tuple(s if extent > m else 0 for s, m, extent in zip(shift, window, spatial_shape))


def offset_windows(spatial_shape: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> Padding:
    """Swin's roll by −shift plus region mask as plain windows: a grid offset by ``shift`` without wrap-around,
    i.e. ``window − shift`` masked tokens in front (none where the shift is 0) and end padding to a multiple."""
    return pad_to_multiple(spatial_shape, window, before=tuple((m - s) % m for m, s in zip(window, shift)))


@lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, ...]) -> torch.Tensor:
    """``[K, K]`` flat index (K = prod(window)) into a ``prod(2w-1)`` table of offsets **query − key** (Swin,
    CrossFormer, MaxViT ``RelPosBias``): per axis ``(y_q - y_k) + (w - 1)``, row-major over axes."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # [D, K]
    rel = coords[:, :, None] - coords[:, None, :]  # [D, K, K] query - key
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for axis, w in enumerate(window):
        index = index * (2 * w - 1) + rel[axis] + (w - 1)
    return index


def flip_table(table: torch.Tensor, rank: int) -> torch.Tensor:
    """Convert a ``[heads, *(2w-1)]`` table between the query − key and key − query conventions.

    ``neighborhood_attention(rel_pos_bias=...)`` indexes by key − query; Swin-style tables by query − key.
    """
    return table.flip(dims=tuple(range(table.dim() - rank, table.dim())))
