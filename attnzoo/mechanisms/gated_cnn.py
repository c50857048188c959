"""MambaOut's Gated CNN mixer: a GLU whose value branch passes through a depthwise conv (Yu & Wang, 2024)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "gated_cnn",
    family="conv",
    paper="MambaOut: Do We Really Need Mamba for Vision?",
    year=2024,
    complexity="N·k",
    is_attention=False,
    receptive_field="local",
    reference="timm.models.mambaout.GatedConvBlock (its mixer: fc1 → split → conv → fc2; the block adds the "
    "LayerNorm before and the residual, LayerScale and drop path after); official yuweihao/MambaOut (read)",
    note="MambaOut stacks Gated CNN blocks alone (the block has no separate MLP); in attnzoo's backbone the mixer "
    "fills the token slot and the block keeps its MLP.",
    size_args={"kernel_size": "kernel"},
)
class GatedCNN(Mechanism):
    """Gated CNN token mixer of MambaOut (Yu & Wang, 2024), after Dauphin et al.'s gated convolution.

    ``fc1`` widens to 2·hidden (hidden = ``int(expansion_ratio · dim)``), split into a gate g, an identity part i and
    a conv part c of ``int(conv_ratio · dim)`` channels; c goes through a ``kernel_size``² depthwise conv (with bias)
    and the output is fc2(GELU(g) ⊙ [i, DWConv(c)]).

    Args:
        dim: channels in and out.
        expansion_ratio: hidden width as a multiple of ``dim`` (8/3 in MambaOut).
        kernel_size: side of the depthwise conv (7).
        conv_ratio: the share of ``dim`` convolved (1.0: ``dim`` channels, the rest of the hidden width passes through).
    """

    def __init__(
        self, dim: int, *, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0
    ) -> None:
        super().__init__(dim)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        if isinstance(conv_ratio, bool) or not 1 <= conv_channels <= hidden:
            raise ValueError(
                f"conv_ratio={conv_ratio!r} gives {conv_channels} conv channels for dim={dim}; it must give "
                f"between 1 and the hidden width int(expansion_ratio · dim)={hidden}"
            )
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        gate, identity, conv = self.fc1(x).split(self.split_sizes, dim=-1)
        conv = to_nhwc(self.conv(to_nchw(conv)))
        return self.fc2(self.act(gate) * torch.cat([identity, conv], dim=-1))

    def extra_repr(self) -> str:
        hidden, _, conv = self.split_sizes
        return f"dim={self.dim}, hidden={hidden}, conv_channels={conv}, kernel_size={self.kernel_size}"
