"""ELA: efficient local attention (coordinate gate with a shared 1-D conv and GroupNorm)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_choice
from .registry import register_mechanism

# variant → (kernel_size, channels per conv group as a divisor of C: 1 = depthwise, 8 = C/8 groups, GroupNorm groups)
ELA_VARIANTS: dict[str, tuple[int, int, int]] = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


@register_mechanism(
    "efficient_local",
    family="channel",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
    year=2024,
    complexity="linear",
    reference="official xiaoyao-star/ELA; timm.layers.coord_attn.EfficientLocalAttn deviates (separate convs, "
    "GroupNorm(1), SiLU before the sigmoid)",
)
class EfficientLocalAttention(Mechanism):
    """Efficient local attention (Xu & Wan, 2024): y = x ⊙ σ(GN(F x_h)) ⊙ σ(GN(F x_w)).

    x_h = mean over W (C×H) and x_w = mean over H (C×W) strips go through ONE shared bias-free Conv1d F
    (C→C, kernel k, zero padding k//2) and ONE shared GroupNorm, so the gate of every channel is the rank-1 outer
    product a_h a_wᵀ. ``variant``: T (k=5, depthwise, GN 32 groups), B (k=7, depthwise, 16), S (k=5, C/8 conv
    groups, 16), L (k=7, C/8 conv groups, 16).
    """

    def __init__(self, dim: int, *, variant: str = "B") -> None:
        super().__init__(dim)
        self.variant = check_choice("variant", variant, tuple(ELA_VARIANTS))
        kernel_size, group_width, norm_groups = ELA_VARIANTS[variant]
        if dim % norm_groups or dim % group_width:
            raise ValueError(
                f"dim={dim} must be divisible by {norm_groups} (GroupNorm groups) and {group_width} (channels per "
                f"conv group) for variant={variant!r}"
            )
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim // group_width, bias=False)
        self.norm = nn.GroupNorm(norm_groups, dim)

    def strip_gate(self, strip: torch.Tensor) -> torch.Tensor:
        """Gate of a pooled strip ``(B, L, C)`` → ``(B, L, C)``, with the shared conv and norm."""
        return torch.sigmoid(self.norm(self.conv(strip.transpose(1, 2)))).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        a_h = self.strip_gate(x.mean(dim=2))  # (B, H, C)
        a_w = self.strip_gate(x.mean(dim=1))  # (B, W, C)
        return x * a_h[:, :, None, :] * a_w[:, None, :, :]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, variant={self.variant!r}, kernel_size={self.kernel_size}"
