"""DLGSANet sparse global self-attention (SparseGSA): transposed (channel) attention with ReLU instead of softmax."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_choice, resolve_heads
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "sparse_global",
    family="global",
    paper="DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution",
    year=2023,
    complexity="linear",
    reference="official NeonLeexiang/DLGSANet (basicsr/archs/dlgsanet_arch.py, SparseAttention)",
    receptive_field="global",
    note="implements the official SparseAttention: Restormer-style transposed attention (a head_dim × head_dim map "
    "per head between L2-normalised channel vectors over all tokens, learned per-head temperature) with ReLU "
    "instead of softmax, so unrelated channels get exactly zero weight; qkv by 1×1 then 3×3 depthwise conv. The "
    "test-time TLC tiling of the official code (local 48×48 crops) is not implemented; activation='softmax' is "
    "Restormer's MDTA",
    test_kwargs={"num_heads": 2},
    test_size=(8, 8),
)
class SparseGlobalAttention(Mechanism):
    """Sparse global self-attention (Li et al., DLGSANet, ICCV 2023), the SparseGSA module.

    Per head, ``A = act(norm(Q) norm(K)ᵀ · τ_h)`` over channels (Q, K: ``head_dim × N``, rows L2-normalised over
    the tokens) and the output is ``A V``: cost linear in the number of tokens, every output depends on every
    token. ``act`` is ReLU (SparseGSA: negative correlations are dropped, giving a sparse map) or softmax
    (Restormer MDTA). Works on 2-D maps (the q/k/v depthwise conv is 3×3).

    Args:
        dim: channels. num_heads: heads (default one per 16 channels). bias: bias of the convolutions (False as in
        the paper). activation: ``"relu"`` (SparseGSA) or ``"softmax"`` (MDTA).
    """

    def __init__(self, dim: int, *, num_heads: int | None = None, bias: bool = False, activation: str = "relu") -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None, default_head_dim=16)
        self.activation = check_choice("activation", activation, ("relu", "softmax"))
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        qkv = self.qkv_dwconv(self.qkv(to_nchw(x)))
        # channels of one head are the "tokens" of this attention; spatial positions are their features
        q, k, v = rearrange(qkv, "b (three h c) y x -> three b c h (y x)", three=3, h=self.num_heads)
        q = F.normalize(q, dim=-1) * self.temperature.reshape(self.num_heads, 1).to(q.dtype)
        k = F.normalize(k, dim=-1)
        if self.activation == "softmax":
            out = attention(q, k, v, scale=1.0)
        else:
            out = torch.einsum("bchn,bdhn->bhcd", q, k).relu().matmul(v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        out = rearrange(out, "b c h (y x) -> b (h c) y x", y=x.shape[1])
        return to_nhwc(self.project_out(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, activation={self.activation!r}"
