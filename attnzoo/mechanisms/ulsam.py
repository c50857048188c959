"""ULSAM: ultra-lightweight subspace attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ._base import Mechanism, check_divisible, check_int
from ._channel_conv import to_nchw
from .registry import register_mechanism


@register_mechanism(
    "ulsam",
    family="channel",
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    year=2020,
    complexity="linear",
    paper_identity=True,
    reference="official Nandan91/ULSAM ulsam.py::ULSAM (no pip package)",
)
class SubspaceAttention(Mechanism):
    """Ultra-lightweight subspace attention (Saini et al., WACV 2020): one spatial softmax map per channel group.

    Channels split into ``num_groups`` subspaces F_n; per subspace
    A_n = SM_HW(ReLU(BN(Conv1×1(C/g→1)(MaxPool3×3(ReLU(BN(DWConv1×1(F_n)))))))) and the output is concat(A_n ⊙ F_n).
    The paper adds F_n back (F̂_n = A_n⊙F_n + F_n); that identity belongs to the block (``paper_identity``).
    ``norm=True`` keeps the BN + ReLU pairs of the official code (BN momentum 0.9 in PyTorch's convention, as
    there); ``norm=False`` is the paper equation without them. The subspaces run batched as grouped convs.
    """

    def __init__(self, dim: int, *, num_groups: int = 4, norm: bool = True) -> None:
        super().__init__(dim)
        self.num_groups = check_int("num_groups", num_groups)
        check_divisible("dim", dim, "num_groups", num_groups)
        self.norm = norm
        self.conv_dws = nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn_dws = nn.BatchNorm2d(dim, momentum=0.9) if norm else nn.Identity()
        self.relu_dws = nn.ReLU() if norm else nn.Identity()
        self.maxpool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(dim, num_groups, 1, groups=num_groups)
        self.bn_point = nn.BatchNorm2d(num_groups, momentum=0.9) if norm else nn.Identity()
        self.relu_point = nn.ReLU() if norm else nn.Identity()

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The subspace maps A_n, shape ``(B, num_groups, H, W)``, each summing to 1 over H·W."""
        t = self.maxpool(self.relu_dws(self.bn_dws(self.conv_dws(to_nchw(x)))))
        logits = self.relu_point(self.bn_point(self.conv_point(t)))
        return logits.flatten(2).softmax(dim=-1).view_as(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        maps = rearrange(self.attention_maps(x), "b g h w -> b h w g 1")
        groups = rearrange(x, "b h w (g c) -> b h w g c", g=self.num_groups)
        return rearrange(groups * maps, "b h w g c -> b h w (g c)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_groups={self.num_groups}, norm={self.norm}"
