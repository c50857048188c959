"""Polarized self-attention (PSA): channel-only and spatial-only polarized gates."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import einsum, rearrange

from ._base import Mechanism, check_choice, renamed_kwargs
from ._channel_conv import softmax_pool
from .registry import register_mechanism


@register_mechanism(
    "polarized",
    family="channel",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    year=2021,
    complexity="linear",
    reference="fightingcv-attention ParallelPolarizedSelfAttention / SequentialPolarizedSelfAttention (paper "
    "variant); official DeLightCMU/PSA PSA_p / PSA_s (variant='official')",
)
class PolarizedSelfAttention(Mechanism):
    """Polarized self-attention (Liu et al., 2021): a channel-only and a spatial-only gate, each keeping C/2 internally.

    Channel: A^ch = σ(LN_C(W_z(Σ_j SM_j(W_q x)_j · W_v x_j))) ∈ (0,1)^C, W_q: C→1, W_v: C→C/2, W_z: C/2→C.
    Spatial: A^sp = σ(SM_{C/2}(GAP(W_q' x)) · W_v' x) ∈ (0,1)^{H×W}, W_q', W_v': C→C/2 (all 1×1 convs).
    ``arrangement='parallel'``: y = A^ch⊙x + A^sp⊙x; ``'sequential'``: z = A^ch⊙x, y = A^sp(z)⊙z.
    ``variant='official'`` follows the authors' code: bias-free convs, no LayerNorm, and the spatial branch takes
    the softmax over H·W of the product instead of over the pooled query's channels.
    """

    @renamed_kwargs(mode="arrangement")
    def __init__(self, dim: int, *, arrangement: str = "parallel", variant: str = "paper") -> None:
        super().__init__(dim)
        self.arrangement = check_choice("arrangement", arrangement, ("parallel", "sequential"))
        self.variant = check_choice("variant", variant, ("paper", "official"))
        if dim < 2:
            raise ValueError(f"dim={dim} must be >= 2 (the branches keep dim // 2 channels)")
        half = dim // 2
        bias = variant == "paper"
        self.ch_wv = nn.Linear(dim, half, bias=bias)
        self.ch_wq = nn.Linear(dim, 1, bias=bias)
        self.ch_wz = nn.Linear(half, dim, bias=bias)
        self.ln = nn.LayerNorm(dim) if variant == "paper" else nn.Identity()
        self.sp_wv = nn.Linear(dim, half, bias=bias)
        self.sp_wq = nn.Linear(dim, half, bias=bias)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1, C)`` channel-only gate."""
        context = softmax_pool(self.ch_wq(x), self.ch_wv(x))  # (B, C/2)
        return torch.sigmoid(self.ln(self.ch_wz(context)))[:, None, None, :]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 1)`` spatial-only gate."""
        query = self.sp_wq(x).mean(dim=(1, 2))  # (B, C/2)
        if self.variant == "paper":
            query = query.softmax(dim=-1)
        logits = einsum(query, self.sp_wv(x), "b c, b h w c -> b h w")
        if self.variant == "official":
            logits = rearrange(logits, "b h w -> b (h w)").softmax(dim=-1).view_as(logits)
        return torch.sigmoid(logits).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.arrangement == "parallel":
            return x * self.channel_gate(x) + x * self.spatial_gate(x)
        z = x * self.channel_gate(x)
        return z * self.spatial_gate(z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, arrangement={self.arrangement!r}, variant={self.variant!r}"
