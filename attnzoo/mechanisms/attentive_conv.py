"""Attentive Convolution (ATConv): content-generated 3×3 kernels with a learned lateral inhibition."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "attentive_conv",
    family="conv",
    paper="Attentive Convolution: Unifying the Expressivity of Self-Attention with Convolutional Efficiency",
    year=2025,
    complexity="N·k",
    is_attention=False,
    reference="official price112/Attentive-Convolution models/AttNet.py::ATConv (read)",
    note="The kernel generator average-pools the whole map (in raster order, AdaptiveAvgPool1d to kernel_size² bins) "
    "so every token influences every kernel: receptive_field='global'.",
    size_args={"kernel_size": "kernel"},
)
class AttentiveConv(Mechanism):
    """Attentive convolution (Yu et al., 2025): Proj(DWConv_{K(x)}(Proj_x(x))) with kernels made from the content.

    Kernels: a 1×1 conv of x, each channel's raster-order token sequence average-pooled to ``kernel_size``² bins,
    GELU, a shared Linear(k², k²): one k×k kernel per sample and channel ("adaptive routing"). Lateral inhibition:
    each kernel minus σ(λ_c) times its own mean tap (λ learned per channel, starting at 0). The kernels then
    convolve a 1×1 projection of x (zero padding), followed by an output 1×1 conv.

    Args:
        dim: channels.
        kernel_size: side of the generated kernels (3 in every AttNet).
        bias: biases of the 1×1 convs and the kernel generator.
    """

    def __init__(self, dim: int, *, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(dim)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        taps = kernel_size**2
        self.kernel_proj = nn.Conv2d(dim, dim, 1, bias=bias)
        self.kernel_act = nn.GELU()
        self.kernel_gen = nn.Linear(taps, taps, bias=bias)
        self.x_proj = nn.Conv2d(dim, dim, 1, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)
        self.difference_control = nn.Parameter(torch.zeros(dim))

    def generate_kernels(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, kernel_size²)`` inhibited kernels for an NCHW map."""
        pooled = F.adaptive_avg_pool1d(self.kernel_proj(image).flatten(2), self.kernel_size**2)
        kernels = self.kernel_gen(self.kernel_act(pooled))
        inhibition = torch.sigmoid(self.difference_control)[:, None] * kernels.mean(dim=-1, keepdim=True)
        return kernels - inhibition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        image = to_nchw(x)
        batch, channels, height, width = image.shape
        kernels = self.generate_kernels(image).reshape(batch * channels, 1, self.kernel_size, self.kernel_size)
        values = self.x_proj(image).reshape(1, batch * channels, height, width)  # one group per (image, channel)
        mixed = F.conv2d(values, kernels, padding=self.kernel_size // 2, groups=batch * channels)
        return to_nhwc(self.proj(mixed.reshape(batch, channels, height, width)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
