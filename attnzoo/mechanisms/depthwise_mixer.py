"""ConvNeXt's token mixer: one large depthwise convolution (Liu et al., CVPR 2022)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "depthwise_mixer",
    family="conv",
    paper="A ConvNet for the 2020s (ConvNeXt)",
    year=2022,
    complexity="N·k",
    is_attention=False,
    receptive_field="local",
    reference="timm.models.convnext.ConvNeXtBlock.conv_dw (create_conv2d(dim, dim, 7, depthwise=True, bias=True))",
    size_args={"kernel_size": "kernel"},
)
class DepthwiseMixer(Mechanism):
    """Depthwise ``kernel_size``² convolution with bias and zero "same" padding (Liu et al., ConvNeXt, CVPR 2022).

    ConvNeXt's block is DWConv7×7 → LN → MLP with a residual; the depthwise conv is its only token mixer, the
    convolutional baseline the attention mechanisms are compared against.

    Args:
        dim: channels (one filter per channel).
        kernel_size: side of the square kernel, odd (7 in ConvNeXt).
        dilation: spacing of the kernel taps (1 in ConvNeXt).
    """

    def __init__(self, dim: int, *, kernel_size: int = 7, dilation: int = 1) -> None:
        super().__init__(dim)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.dilation = check_int("dilation", dilation)
        self.conv_dw = nn.Conv2d(
            dim, dim, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, groups=dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return to_nhwc(self.conv_dw(to_nchw(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, dilation={self.dilation}"
