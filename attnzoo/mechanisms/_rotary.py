"""Rotary position embedding on adjacent channel pairs (RoFormer / LLaMA layout), shared by RoPE mechanisms."""

from __future__ import annotations

import torch

__all__ = ["rotate_pairs"]


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[2p], x[2p+1])`` of ``x [..., d]`` by ``angles [..., d/2]`` (broadcasting).

    ``(a, b) → (a·cos θ − b·sin θ, a·sin θ + b·cos θ)``: the complex product of LLaMA's ``apply_rotary_emb`` and
    RetNet/RMT's ``theta_shift`` with ``rotate_every_two``.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"rotary embedding needs an even channel count, got x.shape={tuple(x.shape)}")
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
