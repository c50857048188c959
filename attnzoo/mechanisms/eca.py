"""ECA-Net efficient channel attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import token_mean
from .registry import register_mechanism


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size ψ(C) = nearest odd of ⌊|log₂C + β| / γ⌋ (an even t becomes t + 1)."""
    t = int(abs(math.log2(channels) + beta) / gamma)
    return t if t % 2 else t + 1


@register_mechanism(
    "eca",
    family="channel",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    year=2020,
    complexity="linear",
    reference="timm.layers.eca.EcaModule(channels=C) (clamps the kernel to ≥ 3, so it differs for C ≤ 4)",
    size_args={"kernel_size": "kernel"},
)
class EfficientChannelAttention(Mechanism):
    """Efficient Channel Attention (Wang et al., CVPR 2020): y = x ⊙ σ(Conv1d_k(GAP(x)) along channels).

    A bias-free 1-D convolution over the pooled channel vector (zero padding) replaces SE's MLP, so each
    channel's gate sees only its ``k`` neighbouring channels. ``kernel_size=None`` picks ``k = ψ(C)`` from the
    channel count (γ = ``gamma``, b = ``beta``): C=4 → 1, 8..64 → 3, 128..1024 → 5, 2048 → 7.
    """

    def __init__(self, dim: int, *, kernel_size: int | None = None, gamma: float = 2, beta: float = 1) -> None:
        super().__init__(dim)
        if kernel_size is None:
            if not gamma > 0:
                raise ValueError(f"gamma={gamma!r} must be > 0")
            kernel_size = eca_kernel_size(dim, gamma, beta)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, shape ``(B, 1, 1, C)``."""
        z = x.mean(dim=(1, 2)).unsqueeze(1)  # (B, 1, C): channels are the conv's length axis
        return torch.sigmoid(self.conv(z))[:, :, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = x.flatten(1, 2)  # (B, H·W, C): the gate's gradient then sums over one axis, faster than over two
        gate = torch.sigmoid(self.conv(token_mean(tokens)))  # (B, 1, C), as in ``gate``
        return (tokens * gate).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
