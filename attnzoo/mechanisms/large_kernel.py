"""VAN large kernel attention (LKA): a decomposed large depthwise conv used as a multiplicative gate."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "large_kernel",
    family="conv",
    receptive_field="local",
    paper="Visual Attention Network",
    year=2022,
    complexity="linear",
    paper_identity=True,
    is_attention=False,
    reference="mmpretrain.models.backbones.van.SpatialAttention (returns x + ours); official Visual-Attention-Network "
    "van.py::Attention / LKA",
    size_args={"kernel_size": "kernel"},
)
class LargeKernelAttention(Mechanism):
    """Large kernel attention (Guo et al., VAN 2022): u ⊙ Conv1×1(DWConv_dilated(DWConv(u))).

    A ``kernel_size``×``kernel_size`` conv is decomposed, for ``dilation`` d, into a (2d−1)×(2d−1) depthwise conv,
    a ⌈K/d⌉×⌈K/d⌉ depthwise conv with dilation d and a 1×1 conv (all with bias); K=21, d=3 gives 5×5 then 7×7
    dilated 3, an exact receptive field of 23×23. With ``projections`` (VAN's "SpatialAttention" block) the mixer is
    Conv1×1(LKA(GELU(Conv1×1(x)))); VAN adds x to that (``paper_identity``). ``projections=False`` returns LKA(x).
    """

    def __init__(self, dim: int, *, kernel_size: int = 21, dilation: int = 3, projections: bool = True) -> None:
        super().__init__(dim)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.dilation = check_int("dilation", dilation)
        local = 2 * dilation - 1
        dilated = math.ceil(kernel_size / dilation)
        if dilated % 2 == 0:
            raise ValueError(
                f"kernel_size={kernel_size} with dilation={dilation} gives an even dilated kernel "
                f"ceil({kernel_size}/{dilation})={dilated}; choose them so that it is odd (e.g. 21 and 3)"
            )
        self.projections = projections
        if projections:
            self.proj_1 = nn.Conv2d(dim, dim, 1)
            self.activation = nn.GELU()
            self.proj_2 = nn.Conv2d(dim, dim, 1)
        self.conv0 = nn.Conv2d(dim, dim, local, padding=local // 2, groups=dim)
        self.conv_spatial = nn.Conv2d(
            dim, dim, dilated, padding=(dilated // 2) * dilation, dilation=dilation, groups=dim
        )
        self.conv1 = nn.Conv2d(dim, dim, 1)

    @property
    def receptive_field(self) -> int:
        """Side of the exact square receptive field: (2d−1) + (⌈K/d⌉−1)·d."""
        return self.conv0.kernel_size[0] + (self.conv_spatial.kernel_size[0] - 1) * self.dilation

    def lka(self, u: torch.Tensor) -> torch.Tensor:
        """LKA on an NCHW tensor."""
        return u * self.conv1(self.conv_spatial(self.conv0(u)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        u = to_nchw(x)
        if not self.projections:
            return to_nhwc(self.lka(u))
        return to_nhwc(self.proj_2(self.lka(self.activation(self.proj_1(u)))))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"receptive_field={self.receptive_field}, projections={self.projections}"
        )
