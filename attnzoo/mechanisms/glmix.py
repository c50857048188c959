"""GLMix: convolutions on the grid in parallel with MHSA among a few soft-clustered slots."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import attention
from ._base import Mechanism, check_int, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["GLMixAttention"]


@register_mechanism(
    "glmix",
    family="summary-token",
    paper="Revisiting the Integration of Convolution and Attention for Vision Backbone (GLMix)",
    year=2024,
    complexity="linear",
    reference="rayleizhu/GLMix models/glnet.py::GLMixBlock._forward_relation (official; read)",
    receptive_field="global",
    note=(
        "As the official GLMixBlock mixer: slots initialised by adaptive average pooling of the input to "
        "√num_tokens × √num_tokens; logits = s·cos(slot, token) with a learnable scale s (init dim^-1/2); slots = "
        "softmax over tokens of the logits times the tokens (soft clustering); MHSA among the slots "
        "(torch.nn.MultiheadAttention layout: in-projection and out-projection with biases); every token = softmax "
        "over slots of the same logits times the updated slots (soft dispatch); plus the local branch "
        "1×1 conv → depthwise kernel_size conv → 1×1 conv. The clustering is soft: gradients flow through the "
        "assignments, the scale and the pooled initial slots. The official block pools its slots from the block "
        "input before the norm; a mixer sees the normalised input."
    ),
    test_kwargs={"num_heads": 2, "num_tokens": 4},
    test_size=(6, 6),
    size_args={"kernel_size": "kernel"},
)
class GLMixAttention(Mechanism):
    """GLMix token mixer (Zhu et al., 2024): local convs + global MHSA on soft-clustered slots, O(N·slots).

    Input ``(B, H, W, C)``.

    Args:
        dim: channels in and out.
        num_heads: heads of the slot attention (default ``dim // 32``).
        num_tokens: slots, a square number (official 64).
        kernel_size: depthwise kernel of the local branch (official 5).
    """

    spatial_ranks = (2,)

    def __init__(self, dim: int, *, num_heads: int | None = None, num_tokens: int = 64, kernel_size: int = 5) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_int("num_tokens", num_tokens)
        if math.isqrt(num_tokens) ** 2 != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be a square number (slots are pooled on a square grid)")
        self.num_tokens, self.pool_size = num_tokens, math.isqrt(num_tokens)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.slot_scale = nn.Parameter(torch.tensor(dim**-0.5))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.local = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        if rows == 0 or cols == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has an empty spatial axis; glmix pools slots from a grid")
        grid = x.permute(0, 3, 1, 2)
        tokens = x.reshape(x.shape[0], rows * cols, self.dim)
        slots = F.adaptive_avg_pool2d(grid, self.pool_size).flatten(2).transpose(1, 2)  # [B, S, C]
        logits = F.normalize(slots, dim=-1) @ (self.slot_scale * F.normalize(tokens, dim=-1)).transpose(1, 2)
        slots = torch.softmax(logits, dim=-1) @ tokens  # soft clustering
        q, k, v = split_qkv(self.qkv(slots), self.num_heads)
        slots = self.proj(merge_heads(attention(q, k, v)))
        out = torch.softmax(logits.transpose(1, 2), dim=-1) @ slots  # soft dispatch
        return out.reshape(x.shape) + self.local(grid).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_tokens={self.num_tokens}, kernel_size={self.kernel_size}"
        )
