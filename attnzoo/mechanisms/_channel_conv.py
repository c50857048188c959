"""Small shared pieces of the channel / convolutional mechanisms: bottleneck width and layout permutes."""

from __future__ import annotations

import torch

from ._base import check_int

__all__ = ["reduced_width", "to_nchw", "to_nhwc"]


def reduced_width(dim: int, reduction: int) -> int:
    """Bottleneck width ``dim // reduction`` (at least 1), the rounding of the SE / CBAM / GCNet papers."""
    check_int("reduction", reduction)
    return max(1, dim // reduction)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last ``(B, H, W, C)`` → ``(B, C, H, W)``."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → channels-last ``(B, H, W, C)``."""
    return x.permute(0, 2, 3, 1)
