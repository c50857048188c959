"""SHViT single-head self-attention (SHSA) on a partial channel slice, and the conv + BatchNorm unit it shares."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int
from .registry import register_mechanism

__all__ = ["SingleHeadSelfAttention", "ConvBN"]


class ConvBN(nn.Sequential):
    """Bias-free ``Conv2d`` then ``BatchNorm2d`` (LeViT / EfficientViT / SHViT unit; children ``c`` and ``bn``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, *, groups: int = 1, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.add_module("c", conv)
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


@register_mechanism(
    "single_head",
    family="head-mixing",
    paper="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design",
    year=2024,
    native_rank=2,
    complexity="quadratic",
    reference="timm.models.shvit.SHSA (NCHW; keys pre_norm, qkv.c/bn, proj.1.c/bn = our proj.c/bn)",
    test_kwargs={"qk_dim": 8, "partial_dim": 12},
)
class SingleHeadSelfAttention(Mechanism):
    """Single-head self-attention on a partial channel slice (Yun & Ro, SHViT, 2024).

    ``x = [x₁ (partial_dim), x₂]``; ``x₁ ← GroupNorm(1)(x₁)``; ``[q, k, v] = BN(Conv1×1(x₁))`` with widths
    ``qk_dim, qk_dim, partial_dim``; one head ``x₁' = softmax(qk_dim^-1/2 · q kᵀ) v`` over all tokens;
    ``y = BN(Conv1×1(ReLU([x₁', x₂])))``. The output BN starts with weight 0, so the module outputs zeros at init.
    ``partial_dim`` defaults to ``round(dim / 4.67)`` (SHViT: 224/336/448 → 48/72/96). Works on any number of axes.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(self, dim: int, *, qk_dim: int = 16, partial_dim: int | None = None) -> None:
        super().__init__(dim)
        if partial_dim is None:
            partial_dim = min(dim, max(1, round(dim / 4.67)))
        if isinstance(partial_dim, bool) or not isinstance(partial_dim, int) or not 1 <= partial_dim <= dim:
            raise ValueError(f"partial_dim={partial_dim!r} must be an int in [1, dim={dim}]")
        self.qk_dim, self.partial_dim = check_int("qk_dim", qk_dim), partial_dim
        self.pre_norm = nn.GroupNorm(1, partial_dim)
        self.qkv = ConvBN(partial_dim, 2 * qk_dim + partial_dim)
        self.proj = ConvBN(dim, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        t = rearrange(x, "b ... c -> b c (...) 1")  # NCHW with the tokens on H, so 1×1 convs and BN apply as is
        x1, x2 = t.split([self.partial_dim, self.dim - self.partial_dim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).split([self.qk_dim, self.qk_dim, self.partial_dim], dim=1)
        q, k, v = (rearrange(u, "b c n 1 -> b n 1 c") for u in (q, k, v))
        x1 = rearrange(attention(q, k, v), "b n 1 c -> b c n 1")
        y = self.proj(torch.relu(torch.cat([x1, x2], dim=1)))
        return rearrange(y, "b c n 1 -> b n c").reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, partial_dim={self.partial_dim}"
