"""Coordinate attention: channel gates that keep one spatial coordinate (Hou et al., CVPR 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import reduced_width
from .registry import register_mechanism


@register_mechanism(
    "coordinate",
    family="channel",
    paper="Coordinate Attention for Efficient Mobile Network Design",
    year=2021,
    complexity="linear",
    is_attention=False,
    receptive_field="local",
    reference="timm.layers.coord_attn.CoordAttn(C, rd_channels=max(8, C // 32), bias=True); official "
    "houqb/CoordAttention coordatt.py::CoordAtt (read)",
    note="Output (i, j) depends on row i and column j only (a cross, not every token): receptive_field='local'. "
    "Defaults follow the official code (width max(min_width, C // 32), biased convs, h-swish), which timm's "
    "CoordAttn reproduces with rd_channels=max(8, C // 32), bias=True.",
)
class CoordinateAttention(Mechanism):
    """Coordinate attention (Hou, Zhou, Feng, CVPR 2021): y = x ⊙ σ(F_h(f_h)) ⊙ σ(F_w(f_w)).

    The map is average-pooled along W (one descriptor per row) and along H (one per column); both strips are
    concatenated, passed through a shared 1×1 conv → BatchNorm → h-swish of width ``max(min_width, dim // reduction)``
    and split again; a 1×1 conv per direction and a sigmoid give a gate per (row, channel) and per (column, channel).

    Args:
        dim: channels.
        reduction: channel squeeze ratio of the shared conv (32 in the paper).
        min_width: the smallest shared width (8 in the paper).
        bias: biases in the three 1×1 convs (the official code has them).
    """

    def __init__(self, dim: int, *, reduction: int = 32, min_width: int = 8, bias: bool = True) -> None:
        super().__init__(dim)
        check_int("min_width", min_width)
        self.reduction = reduction
        hidden = max(min_width, reduced_width(dim, reduction))
        self.conv1 = nn.Linear(dim, hidden, bias=bias)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = nn.Linear(hidden, dim, bias=bias)
        self.conv_w = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        strips = torch.cat([x.mean(dim=2), x.mean(dim=1)], dim=1)  # (B, H + W, C): row then column descriptors
        shared = self.act(self.bn1(self.conv1(strips).transpose(1, 2)).transpose(1, 2))
        rows, cols = shared.split([height, width], dim=1)
        gate_h = torch.sigmoid(self.conv_h(rows))[:, :, None, :]  # (B, H, 1, C)
        gate_w = torch.sigmoid(self.conv_w(cols))[:, None, :, :]  # (B, 1, W, C)
        return x * gate_h * gate_w

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, hidden={self.conv1.out_features}"
