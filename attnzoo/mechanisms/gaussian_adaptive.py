"""GAAM: Gaussian adaptive attention, a learned Gaussian mixture over standardised features (no queries or keys)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._base import Mechanism, check_choice, check_int, flatten_tokens
from .registry import register_mechanism

__all__ = ["GaussianAdaptiveAttention"]

AXES = {"channels": -1, "tokens": 1}
MIXTURES = ("sum", "product")


@register_mechanism(
    "gaussian_adaptive",
    family="probabilistic",
    paper="Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple Modalities",
    year=2024,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="gaussian-adaptive-attention 0.1.5 MultiHeadGaussianAdaptiveAttention (= mixture='product')",
    note=(
        "Statistics over the tokens by default, as the official usage example (norm_axis=1 on (batch, tokens, "
        "features)). The official module splits the normalised axis into num_heads contiguous chunks; on the token "
        "axis a chunk is a band of image rows, so the default num_heads=1 normalises over the whole map (the example's "
        "num_heads=4 is available). norm_axis='channels' makes it a per-token feature gate that mixes no tokens."
    ),
    test_kwargs={"num_heads": 4, "num_gaussians": 3},
    test_size=(12,),
)
class GaussianAdaptiveAttention(Mechanism):
    """Gaussian adaptive attention (Ioannides et al., GAAM, 2024): ``y = x ⊙ M̂`` with M̂ a normalised Gaussian mixture.

    The ``norm_axis`` ('tokens', the default: per channel over each head's token chunk, so every token's weight
    depends on the whole chunk; 'channels': per token over each head's channel chunk, a gate that mixes no tokens;
    chunks as in the official code, the last one taking the remainder) is split into ``num_heads`` chunks
    (default 1: the whole map); per chunk ``μ`` = mean, ``σ² = var + eps`` (unbiased var), ``z_g = (x − μ − δ_g)/σ``;
    ``mixture='sum'`` (latest official variant): ``M = Σ_g softmax(ω)_g · exp(−z_g²/(2c_g²))``; ``'product'`` (the
    pip wheel 0.1.5): ``M = Π_g N(z_g; 0, c_g²)``. ``M̂ = M / max(Σ_chunk M, eps)``. Learnable per head and Gaussian:
    ``mean_offsets`` δ (init 0), ``scales`` c (init 2), ``mixture_logits`` ω (init 1). Takes ``(B, N, C)`` or flattens
    ``(B, *spatial, C)``; GAT's residual belongs to the block.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 1,
        num_gaussians: int = 5,
        norm_axis: str = "tokens",
        mixture: str = "sum",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(dim)
        check_int("num_heads", num_heads)
        check_int("num_gaussians", num_gaussians)
        check_choice("norm_axis", norm_axis, AXES)
        check_choice("mixture", mixture, MIXTURES)
        if norm_axis == "channels" and dim < 2 * num_heads:
            raise ValueError(
                f"norm_axis='channels' needs dim={dim} >= 2·num_heads={2 * num_heads} (two channels per chunk)"
            )
        self.num_heads, self.num_gaussians = num_heads, num_gaussians
        self.norm_axis, self.mixture, self.eps = norm_axis, mixture, float(eps)
        self.mean_offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.scales = nn.Parameter(torch.full((num_heads, num_gaussians), 2.0))
        self.mixture_logits = nn.Parameter(torch.ones(num_heads, num_gaussians)) if mixture == "sum" else None

    def chunk_sizes(self, length: int) -> list[int]:
        size = length // self.num_heads
        if size < 2:
            raise ValueError(
                f"norm_axis={self.norm_axis!r} has length {length}: it needs >= 2·num_heads={2 * self.num_heads} "
                "elements (two per chunk)"
            )
        return [size] * (self.num_heads - 1) + [length - size * (self.num_heads - 1)]

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """``M̂`` for ``(B, N, C)`` tokens: same shape, summing to 1 over each chunk."""
        axis = AXES[self.norm_axis]
        chunks = tokens.split(self.chunk_sizes(tokens.shape[axis]), dim=axis)
        out = []
        for head, chunk in enumerate(chunks):
            mean = chunk.mean(dim=axis, keepdim=True)
            std = (chunk.var(dim=axis, keepdim=True) + self.eps).sqrt()
            delta = self.mean_offsets[head].to(chunk.dtype)
            c = self.scales[head].to(chunk.dtype)
            z = (chunk.unsqueeze(-1) - mean.unsqueeze(-1) - delta) / std.unsqueeze(-1)  # [..., G]
            if self.mixture == "sum":
                w = self.mixture_logits[head].softmax(dim=0).to(chunk.dtype)
                m = (w * torch.exp(-(z**2) / (2 * c**2))).sum(dim=-1)
            else:
                m = (torch.exp(-(z**2) / (2 * c**2)) / torch.sqrt(2 * math.pi * c**2)).prod(dim=-1)
            out.append(m / m.sum(dim=axis, keepdim=True).clamp_min(self.eps))
        return torch.cat(out, dim=axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        return (tokens * self.weights(tokens)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_gaussians={self.num_gaussians}, "
            f"norm_axis={self.norm_axis!r}, mixture={self.mixture!r}"
        )
