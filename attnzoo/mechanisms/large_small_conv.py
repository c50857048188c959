"""LSNet's LS convolution: large-kernel perception predicts small dynamic kernels ("See Large, Focus Small")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_divisible, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


def small_kernel_aggregation(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """SKA: ``out[b, c, i, j] = Σ_t x[b, c, i + dy_t, j + dx_t] · kernels[b, c mod K, t, i, j]`` with zero padding.

    ``x`` ``(B, C, H, W)``, ``kernels`` ``(B, K, kernel_size², H, W)`` with C a multiple of K; taps row-major.
    """
    batch, channels, height, width = x.shape
    shared = kernels.shape[1]
    radius = kernel_size // 2
    padded = F.pad(x, (radius, radius, radius, radius))
    padded = padded.reshape(batch, channels // shared, shared, *padded.shape[2:])  # channel c = g·K + (c mod K)
    out = x.new_zeros(batch, channels // shared, shared, height, width)
    for tap in range(kernel_size * kernel_size):
        dy, dx = divmod(tap, kernel_size)
        out = out + padded[..., dy : dy + height, dx : dx + width] * kernels[:, None, :, tap]
    return out.reshape(batch, channels, height, width)


class ConvBN(nn.Sequential):
    """Conv (no bias) → BatchNorm on NCHW maps (LSNet's ``Conv2d_BN``)."""

    def __init__(self, dim: int, out_dim: int, kernel_size: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_dim),
        )


@register_mechanism(
    "large_small_conv",
    family="conv",
    paper="LSNet: See Large, Focus Small",
    year=2025,
    complexity="N·k",
    paper_identity=True,
    is_attention=False,
    receptive_field="global",
    reference="official jameslahm/lsnet model/lsnet.py::LSConv, LKP and ska.py::SKA (read; the Triton SKA kernel "
    "computes out[c] = Σ_t x[c, shifted by t] · w[c mod (C / groups), t])",
    note="Returns BN(SKA(x, LKP(x))); LSConv adds x to it (paper_identity). The aggregation is 3×3, but the "
    "GroupNorm of the kernel generator normalises over the whole map, so every token influences every kernel: "
    "receptive_field='global'.",
    size_args={"kernel_size": "kernel"},
)
class LargeSmallConv(Mechanism):
    """LS convolution (Wang et al., LSNet, CVPR 2025): large-kernel perception, small-kernel aggregation.

    Perception (LKP): z = ReLU(BN(Conv1×1(ReLU(BN(DWConv_{K_L}(ReLU(BN(Conv1×1(x)))))))) at half width, then
    GroupNorm(Conv1×1(z)) gives, at every position, ``C / groups`` small kernels of ``kernel_size``² taps.
    Aggregation (SKA): channel c is convolved with kernel ``c mod (C / groups)`` of its own position (so channels
    c, c + C/groups, … share one dynamic kernel); a final BatchNorm.

    Args:
        dim: channels, even and a multiple of ``groups``.
        perception_kernel_size: side K_L of the large depthwise perception conv (7).
        kernel_size: side of the small dynamic aggregation kernels (3).
        groups: channels sharing one dynamic kernel (8).
    """

    def __init__(self, dim: int, *, perception_kernel_size: int = 7, kernel_size: int = 3, groups: int = 8) -> None:
        super().__init__(dim)
        self.perception_kernel_size = check_int("perception_kernel_size", perception_kernel_size, odd=True)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.groups = check_int("groups", groups)
        check_divisible("dim", dim, "2 (LKP works at half width)", 2)
        check_divisible("dim", dim, "groups", groups)
        half, self.kernels = dim // 2, dim // groups
        self.cv1 = ConvBN(dim, half)
        self.cv2 = ConvBN(half, half, perception_kernel_size, groups=half)
        self.cv3 = ConvBN(half, half)
        self.act = nn.ReLU()
        self.cv4 = nn.Conv2d(half, kernel_size**2 * self.kernels, 1)
        self.norm = nn.GroupNorm(self.kernels, kernel_size**2 * self.kernels)
        self.bn = nn.BatchNorm2d(dim)

    def dynamic_kernels(self, image: torch.Tensor) -> torch.Tensor:
        """LKP on an NCHW map: ``(B, C / groups, kernel_size², H, W)``."""
        z = self.act(self.cv3(self.cv2(self.act(self.cv1(image)))))
        weights = self.norm(self.cv4(z))
        return weights.reshape(image.shape[0], self.kernels, self.kernel_size**2, *image.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        image = to_nchw(x)
        return to_nhwc(self.bn(small_kernel_aggregation(image, self.dynamic_kernels(image), self.kernel_size)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, perception_kernel_size={self.perception_kernel_size}, kernel_size={self.kernel_size}, "
            f"groups={self.groups}"
        )
