"""RALA: rank-augmented linear attention (query-reweighted keys, 2-D RoPE, LePE, output gate)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ._base import Mechanism, cached_table, check_divisible, check_int, merge_heads, resolve_heads, split_qkv
from ._rotary import rotate_pairs
from .registry import register_mechanism

__all__ = ["RankAugmentedLinearAttention"]


@lru_cache(maxsize=32)
def _grid_angles(height: int, width: int, head_dim: int) -> torch.Tensor:
    """RALA's 2-D RoPE: the first ``head_dim/4`` pairs turn with the row, the rest with the column; ``[H, W, d/2]``."""
    theta = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, dtype=torch.float64)
    rows = torch.arange(height, dtype=torch.float64)[:, None, None] * theta
    cols = torch.arange(width, dtype=torch.float64)[None, :, None] * theta
    return torch.cat([rows.expand(height, width, -1), cols.expand(height, width, -1)], dim=-1)


@register_mechanism(
    "rank_augmented_linear",
    family="linear",
    paper="Breaking the Low-Rank Dilemma of Linear Attention",
    year=2025,
    native_rank=2,
    complexity="linear",
    reference="qhfan/RALA classfication/RALA.py GateLinearAttentionNoSilu",
    note=(
        "As the official GateLinearAttentionNoSilu: φ = elu + 1; keys re-weighted by α_j = softmax_j(d^-1/2·q̄·k_j) "
        "(q̄ = mean query) times N; numerator with 2-D RoPE on φ(q), φ(k) (first d/4 pairs by row, rest by column, "
        "θ = 10000^-linspace(0, 1, d/4)), denominator without; 5×5 depthwise LePE on v; output gate o (a fourth "
        "linear projection, no activation) multiplies before the output projection."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class RankAugmentedLinearAttention(Mechanism):
    """Rank-augmented linear attention (Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025).

    ``φ = elu + 1``; ``k̃_j = N·softmax_j(s·q̄·φ(k_j))·φ(k_j)`` (query-reweighted KV buffer);
    ``o_i = R(φ(q_i))·(Σ_j R(k̃_j) v_jᵀ / N) / (φ(q_i)·mean_j k̃_j + 1e-6)`` with the 2-D rotation R;
    ``out = proj((o + LePE(v)) ⊙ W_o x)``.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``); ``head_dim`` must be divisible by 4 (2-D RoPE).
        kernel_size: depthwise LePE convolution on v.
        proj_drop: dropout on the output.
    """

    def __init__(self, dim: int, *, num_heads: int | None = None, kernel_size: int = 5, proj_drop: float = 0.0) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_divisible("head_dim", self.head_dim, "4 (2-D rotary pairs)", 4)
        check_int("kernel_size", kernel_size, odd=True)
        self.qkvo = nn.Linear(dim, 4 * dim)
        self.lepe = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def projections(self, x: torch.Tensor):
        """``φ(q), k̃ (re-weighted φ(k)), v`` as ``[B, N, heads, d]`` and the gate ``o [B, H, W, C]``."""
        qkv, gate = self.qkvo(x).split([3 * self.dim, self.dim], dim=-1)
        q, k, v = split_qkv(qkv.flatten(1, 2), self.num_heads)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        weights = torch.einsum("bhd,bnhd->bnh", q.mean(1), k * self.head_dim**-0.5).softmax(dim=1)
        return q, k * weights.unsqueeze(-1) * k.shape[1], v, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        q, k, v, gate = self.projections(x)
        n = q.shape[1]
        angles = cached_table(_grid_angles, height, width, self.head_dim).to(x.device).flatten(0, 1)[:, None]
        q_rot, k_rot = rotate_pairs(q, angles), rotate_pairs(k, angles)
        kv = torch.einsum("bnhd,bnhe->bhde", k_rot, v) / n
        normaliser = torch.einsum("bnhd,bhd->bnh", q, k.mean(1)) + 1e-6
        out = merge_heads(torch.einsum("bnhd,bhde->bnhe", q_rot, kv) / normaliser.unsqueeze(-1))
        lepe = self.lepe(rearrange(v, "b (y x) h d -> b (h d) y x", y=height))
        out = out.unflatten(1, (height, width)) + lepe.permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out * gate))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
