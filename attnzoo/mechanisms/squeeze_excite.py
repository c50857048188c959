"""Squeeze-and-Excitation channel gate (SE)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism
from ._channel_conv import reduced_width, token_mean
from .registry import register_mechanism


@register_mechanism(
    "squeeze_excite",
    family="channel",
    paper="Squeeze-and-Excitation Networks",
    year=2018,
    complexity="linear",
    reference="timm.layers.squeeze_excite.SEModule(C, rd_channels=C // 16); torchvision.ops.SqueezeExcitation",
)
class SqueezeExcite(Mechanism):
    """Squeeze-and-Excitation gate (Hu et al., CVPR 2018): y = x ⊙ σ(W₂ ReLU(W₁ GAP(x))).

    The squeeze is a global average over H and W; the excitation is a bottleneck MLP ``C → C // reduction → C``
    (at least one hidden unit) followed by a sigmoid, so the gate is one number in (0, 1) per channel.
    """

    def __init__(self, dim: int, *, reduction: int = 16, bias: bool = True) -> None:
        super().__init__(dim)
        hidden = reduced_width(dim, reduction)
        self.reduction = reduction
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """Gate values in (0, 1) from pooled channels ``z`` (any leading shape, channels last)."""
        return torch.sigmoid(self.fc2(self.act(self.fc1(z))))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, shape ``(B, 1, 1, C)``."""
        return self.excite(x.mean(dim=(1, 2), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = x.flatten(1, 2)  # (B, H·W, C): the gate's gradient then sums over one axis, faster than over two
        return (tokens * self.excite(token_mean(tokens))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, hidden={self.fc1.out_features}"
