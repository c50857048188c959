"""CBAM: channel gate followed by spatial gate."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import reduced_width, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "cbam",
    family="channel",
    paper="CBAM: Convolutional Block Attention Module",
    year=2018,
    complexity="linear",
    reference="timm.layers.cbam.CbamModule(C, rd_ratio=1/16, mlp_bias=True); "
    "official Jongchan/attention-module MODELS/cbam.py",
)
class ConvBlockAttention(Mechanism):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): a channel gate, then a spatial gate.

    Channel: M_c = σ(MLP(AvgPool x) + MLP(MaxPool x)) with one shared MLP ``C → C // reduction → C``; x' = x ⊙ M_c.
    Spatial: M_s = σ(BN(Conv_k([mean_C x'; max_C x']))) (conv without bias, zero padding; the BN comes from the
    official code, ``spatial_norm``); y = x' ⊙ M_s. The pooled pair is stacked in the paper's order [avg; max]
    (the official code stacks [max; mean]: swap the conv's two input channels when loading its weights).
    """

    def __init__(
        self,
        dim: int,
        *,
        reduction: int = 16,
        spatial_kernel_size: int = 7,
        mlp_bias: bool = True,
        spatial_norm: bool = True,
    ) -> None:
        super().__init__(dim)
        hidden = reduced_width(dim, reduction)
        self.reduction = reduction
        self.spatial_kernel_size = check_int("spatial_kernel_size", spatial_kernel_size, odd=True)
        self.fc1 = nn.Linear(dim, hidden, bias=mlp_bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim, bias=mlp_bias)
        k = self.spatial_kernel_size
        self.spatial_conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
        self.spatial_norm = nn.BatchNorm2d(1) if spatial_norm else nn.Identity()

    def mlp(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z)))

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1, C)`` gate from the average- and max-pooled descriptors."""
        avg = x.mean(dim=(1, 2), keepdim=True)
        peak = x.amax(dim=(1, 2), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(peak))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 1)`` gate from the channel-mean and channel-max maps."""
        pooled = torch.stack((x.mean(dim=-1), x.amax(dim=-1)), dim=1)  # (B, 2, H, W), paper order [avg; max]
        logits = self.spatial_norm(self.spatial_conv(pooled))
        return to_nhwc(torch.sigmoid(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = x * self.channel_gate(x)
        return x * self.spatial_gate(x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, reduction={self.reduction}, spatial_kernel_size={self.spatial_kernel_size}, "
            f"spatial_norm={not isinstance(self.spatial_norm, nn.Identity)}"
        )
