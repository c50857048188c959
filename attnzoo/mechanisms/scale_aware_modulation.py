"""SMT scale-aware modulation: multi-head multi-scale depthwise convs aggregated into a modulator of v."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ._base import Mechanism, check_divisible, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "scale_aware_modulation",
    family="conv",
    receptive_field="local",
    paper="Scale-Aware Modulation Meet Transformer",
    year=2023,
    complexity="linear",
    is_attention=False,
    reference="official AFeng-x/SMT models/smt.py::Attention(ca_attention=1) (no pip package)",
)
class ScaleAwareModulation(Mechanism):
    """Scale-aware modulation (Lin et al., ICCV 2023): y = Linear(SAA(MHMC(s)) ⊙ v), s and v linear maps of x.

    Multi-head mixed convolution (MHMC): s is split into ``ca_num_heads`` contiguous channel heads and head i goes
    through a depthwise (3+2i)×(3+2i) conv. Scale-aware aggregation (SAA): channels are re-interleaved so that each
    group of ``ca_num_heads`` holds one channel from every head, mixed by a grouped 1×1 conv (C → ``expand_ratio``·C),
    BN and GELU, then a 1×1 conv back to C. With 4 heads the receptive field is 9×9.
    """

    def __init__(
        self,
        dim: int,
        *,
        ca_num_heads: int = 4,
        expand_ratio: int = 2,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.ca_num_heads = check_int("ca_num_heads", ca_num_heads)
        self.expand_ratio = check_int("expand_ratio", expand_ratio)
        check_divisible("dim", dim, "ca_num_heads", ca_num_heads)
        head_width = dim // ca_num_heads
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.s = nn.Linear(dim, dim, bias=qkv_bias)
        self.local_convs = nn.ModuleList(
            nn.Conv2d(head_width, head_width, 3 + 2 * i, padding=1 + i, groups=head_width) for i in range(ca_num_heads)
        )
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=head_width)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.act = nn.GELU()
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def receptive_field(self) -> int:
        return 3 + 2 * (self.ca_num_heads - 1)

    def modulator(self, x: torch.Tensor) -> torch.Tensor:
        """SAA(MHMC(s)), channels-last ``(B, H, W, C)``."""
        heads = to_nchw(self.s(x)).chunk(self.ca_num_heads, dim=1)
        mixed = torch.stack([conv(head) for conv, head in zip(self.local_convs, heads)], dim=1)
        interleaved = rearrange(mixed, "b i j h w -> b (j i) h w")  # channel j·heads + i ← head i, channel j
        return to_nhwc(self.proj1(self.act(self.bn(self.proj0(interleaved)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj_drop(self.proj(self.modulator(x) * self.v(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ca_num_heads={self.ca_num_heads}, expand_ratio={self.expand_ratio}"
