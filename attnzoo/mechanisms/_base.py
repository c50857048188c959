"""Shared vocabulary for mechanisms: head arithmetic, input checks, channels-last helpers."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["Mechanism", "resolve_heads", "check_divisible"]


def resolve_heads(dim: int, num_heads: int | None, head_dim: int | None, *, default_head_dim: int = 32) -> tuple[int, int]:
    """``(num_heads, head_dim)`` from the constructor vocabulary; inner width is ``num_heads·head_dim``.

    ``head_dim`` given: heads = ``num_heads`` or ``dim // head_dim``; otherwise ``head_dim = dim // num_heads``
    (``num_heads`` defaulting to ``dim // default_head_dim``). Raises naming the argument on bad combinations.
    """
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads={num_heads!r} must be a positive int")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"head_dim={head_dim!r} must be a positive int")
    if head_dim is not None:
        if num_heads is None:
            if dim % head_dim:
                raise ValueError(f"dim={dim} must be divisible by head_dim={head_dim} when num_heads is not given")
            num_heads = dim // head_dim
        return num_heads, head_dim
    if num_heads is None:
        num_heads = max(1, dim // default_head_dim)
    if dim % num_heads:
        raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    return num_heads, dim // num_heads


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


class Mechanism(nn.Module):
    """Base class: channels-last ``(B, *spatial, C) -> (B, *spatial, C)`` with one input check.

    Subclasses set ``spatial_ranks`` (accepted numbers of spatial axes) and implement ``forward``; ``output_shape``
    says what shape ``forward`` returns for an input shape (identity unless the mechanism resamples).
    """

    mechanism_name: str = ""
    spatial_ranks: Sequence[int] = (2,)

    def __init__(self, dim: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive int")
        self.dim = dim

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate ``x`` and return its spatial shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        rank = x.dim() - 2
        if rank not in tuple(self.spatial_ranks):
            axes = " or ".join(str(r) for r in self.spatial_ranks)
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, *spatial, dim) with {axes} spatial axes, "
                f"got x.shape={tuple(x.shape)}"
            )
        if x.shape[-1] != self.dim:
            raise ValueError(f"x.shape={tuple(x.shape)} must end in dim={self.dim}")
        if not x.is_floating_point():
            raise TypeError(f"x.dtype={x.dtype} must be floating point")
        return tuple(x.shape[1:-1])

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
