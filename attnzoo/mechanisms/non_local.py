"""Non-local block (embedded Gaussian) without its residual: the dense-attention baseline of CCNet and PSA."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_int, flatten_tokens
from ._channel_conv import reduced_width
from .registry import register_mechanism


@register_mechanism(
    "non_local",
    family="global",
    paper="Non-local Neural Networks",
    year=2018,
    native_rank=2,
    reference="timm.layers.non_local_attn.NonLocalAttn (its output minus the shortcut)",
    receptive_field="global",
    test_size=(8, 8),
)
class NonLocal(Mechanism):
    """Non-local block, embedded-Gaussian form (Wang, Girshick, Gupta, He, CVPR 2018), residual-free.

    ``y = BN(W_z · softmax(θ(x) φ(x)ᵀ · dim^-½) g(x))``: one head of width ``dim // reduction`` with 1×1 (per-token
    linear) projections θ, φ, g (named ``t``, ``p``, ``g`` as in timm) and an output projection ``z`` followed by
    batch norm. timm's ``NonLocalAttn`` adds the input back; this module leaves the residual to the block.

    Args:
        dim: channels. reduction: inner width ``dim // reduction`` (the paper halves the channels).
        rank: spatial axes (1, 2 or 3).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(self, dim: int, *, reduction: int = 2, rank: int = 2) -> None:
        super().__init__(dim, rank)
        self.reduction = check_int("reduction", reduction)
        inner = reduced_width(dim, reduction)
        self.t = nn.Linear(dim, inner)
        self.p = nn.Linear(dim, inner)
        self.g = nn.Linear(dim, inner)
        self.z = nn.Linear(inner, dim)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)[:, :, None]  # one head
        out = attention(self.t(tokens), self.p(tokens), self.g(tokens), scale=self.dim**-0.5)
        y = self.z(out[:, :, 0])
        return self.norm(y.transpose(1, 2)).transpose(1, 2).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}"
