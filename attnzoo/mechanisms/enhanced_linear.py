"""L²ViT's enhanced linear global attention: ReLU-kernel linear attention plus a local concentration module."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int, check_positive, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .linear import linear_attention_associative
from .registry import register_mechanism

__all__ = ["EnhancedLinearAttention"]


@register_mechanism(
    "enhanced_linear",
    family="linear",
    paper="The Linear Attention Resurrection in Vision Transformer",
    year=2025,
    native_rank=2,
    complexity="linear",
    reference="paper equations and text (no official code read; see note)",
    note=(
        "From the paper's description (the official repository was not found in the search index): φ = ReLU, "
        "o = φ(q)(Σφ(k)vᵀ) / (φ(q)·Σφ(k) + eps) per head; the local concentration module LCM = DWConv k×k → GELU → "
        "BatchNorm → DWConv k×k (k = 7) is added to the attention output before the output projection."
    ),
    test_kwargs={"num_heads": 2, "kernel_size": 3},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class EnhancedLinearAttention(Mechanism):
    """Enhanced linear attention (Zheng, "The Linear Attention Resurrection in Vision Transformer", 2025).

    Global ReLU-kernel linear attention, whose dispersed attention is re-concentrated locally by two depthwise
    convolutions (LCM): ``out = proj(o + LCM(o))``.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``).
        kernel_size: the LCM depthwise convolutions.
        eps: added to the normaliser.
        qkv_bias: bias of the qkv projection.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        kernel_size: int = 7,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_int("kernel_size", kernel_size, odd=True)
        self.eps = check_positive("eps", eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        pad = kernel_size // 2
        self.lcm = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim),
            nn.GELU(),
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim),
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The global linear attention ``o [B, H, W, C]`` (before the LCM)."""
        q, k, v = split_qkv(self.qkv(flatten_tokens(x)), self.num_heads)
        out = linear_attention_associative(F.relu(q), F.relu(k), v, eps=self.eps)
        return merge_heads(out).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        out = self.attend(x)
        out = out + self.lcm(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
