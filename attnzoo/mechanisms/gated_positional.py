"""ConViT gated positional self-attention (GPSA): content attention gated against a learned positional attention."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, cached_table, check_probability, flatten_tokens, merge_heads, resolve_heads
from .registry import register_mechanism

__all__ = ["GatedPositionalSelfAttention", "relative_offsets"]


@lru_cache(maxsize=32)
def relative_offsets(height: int, width: int) -> torch.Tensor:
    """``[N, N, 3]`` float64 features ``(Δx, Δy, Δx² + Δy²)`` of every (query, key) pair, Δ = key − query,
    tokens row-major (ConViT's ``rel_indices``)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten().double(), xs.flatten().double()
    dx = xs[None, :] - xs[:, None]
    dy = ys[None, :] - ys[:, None]
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1)


@register_mechanism(
    "gated_positional",
    family="global",
    paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
    year=2021,
    native_rank=2,
    complexity="quadratic",
    reference="timm.models.convit.GPSA (call local_init() on it; square inputs only)",
    test_kwargs={"num_heads": 4},
    test_size=(5, 6),
)
class GatedPositionalSelfAttention(Mechanism):
    """Gated positional self-attention (d'Ascoli et al., ConViT, 2021) on a 2-D token grid.

    Per head ``A = (1 − σ(λ))·softmax(s·q kᵀ) + σ(λ)·softmax(pos_proj(r))`` with ``r = (Δx, Δy, Δx²+Δy²)``,
    Δ = key − query, ``y = proj(A v)``. ``local_init=True`` applies ConViT's locality initialisation (v = identity,
    heads on a √h×√h grid of preferred offsets with strength ``locality_strength``, λ = 1), so each head starts as a
    soft convolution. ``attn_drop`` drops the content and positional weights independently.
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
        local_init: bool = True,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        inner = self.num_heads * self.head_dim
        if local_init and inner != dim:
            raise ValueError(
                f"local_init=True sets v to the identity, so num_heads·head_dim={inner} must equal dim={dim}"
            )
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.locality_strength = float(locality_strength)
        self.qk = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.pos_proj = nn.Linear(3, self.num_heads)
        self.gating_param = nn.Parameter(torch.ones(self.num_heads))
        self.proj = nn.Linear(inner, dim)
        self.pos_drop = nn.Dropout(self.attn_drop)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        if local_init:
            self.local_init()

    @torch.no_grad()
    def local_init(self) -> None:
        """ConViT locality init: head ``p = h₁ + g·h₂`` on a g×g grid (g = ⌊√h⌋, centre c) gets positional weights
        ``α·(2(h₂−c), 2(h₁−c), −1)`` for ``(Δx, Δy, |Δ|²)``, so its score is ``−α‖Δ − (h₂−c, h₁−c)‖² + const``."""
        self.v.weight.copy_(torch.eye(self.dim, dtype=self.v.weight.dtype))
        grid = math.isqrt(self.num_heads)
        centre = (grid - 1) / 2
        for head in range(grid * grid):
            h1, h2 = head % grid, head // grid
            self.pos_proj.weight[head] = torch.tensor([2 * (h2 - centre), 2 * (h1 - centre), -1.0])
        self.pos_proj.weight.mul_(self.locality_strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        tokens = flatten_tokens(x)
        q, k = rearrange(self.qk(tokens), "b n (two h d) -> two b n h d", two=2, h=self.num_heads)
        v = rearrange(self.v(tokens), "b n (h d) -> b n h d", h=self.num_heads)
        dropout = self.attn_drop if self.training else 0.0
        content = attention(q, k, v, dropout_p=dropout)
        offsets = cached_table(relative_offsets, height, width).to(device=x.device, dtype=x.dtype)
        positional_weights = self.pos_drop(self.pos_proj(offsets).softmax(dim=1))  # [N_q, N_k, h]
        positional = torch.einsum("qkh,bkhd->bqhd", positional_weights, v)
        gate = torch.sigmoid(self.gating_param).to(x.dtype)[:, None]
        out = (1 - gate) * content + gate * positional
        out = self.proj_drop(self.proj(merge_heads(out)))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, locality_strength={self.locality_strength}"
