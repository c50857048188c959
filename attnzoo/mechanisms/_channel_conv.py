"""Small shared pieces of the channel / convolutional mechanisms: argument checks and layout permutes."""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["check_positive_int", "check_choice", "reduced_width", "to_nchw", "to_nhwc"]


def check_positive_int(name: str, value: Any, *, odd: bool = False) -> int:
    """Return ``value`` if it is a positive int (odd when ``odd``), else raise naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if odd and value % 2 == 0:
        raise ValueError(f"{name}={value} must be odd (same-size zero padding needs a centred kernel)")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r} must be one of {tuple(choices)}")
    return value


def reduced_width(dim: int, reduction: int) -> int:
    """Bottleneck width ``dim // reduction`` (at least 1), the rounding of the SE / CBAM / GCNet papers."""
    check_positive_int("reduction", reduction)
    return max(1, dim // reduction)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last ``(B, H, W, C)`` → ``(B, C, H, W)``."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → channels-last ``(B, H, W, C)``."""
    return x.permute(0, 2, 3, 1)
