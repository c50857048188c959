"""GFNet / SpectFormer global filter: elementwise learnable gating in the 2-D Fourier domain."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_resolution
from .registry import register_mechanism


@register_mechanism(
    "spectral_gating",
    family="spectral",
    paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer; "
    "Global Filter Networks for Image Classification",
    year=2023,
    complexity="linear",
    is_attention=False,
    reference="official raoyongming/GFNet gfnet.py::GlobalFilter (no pip package)",
)
class SpectralGating(Mechanism):
    """Global filter (Rao et al., GFNet 2021; Patro et al., SpectFormer 2023): y = irfft2(rfft2(x) ⊙ W).

    Both transforms run over (H, W) with ``norm='ortho'`` in at least fp32; W ∈ C^{h×w×C} is learnable (real and
    imaginary parts N(0, 0.02²)), equivalent to a per-channel circular convolution over the whole map. The filter is
    sized for ``input_resolution`` (h, w) = (H, W//2+1) when given, else ``filter_size`` (default (14, 8): 14×14
    tokens); other input sizes use W resized bilinearly (align_corners=True, real and imaginary parts separately, as
    HorNet's global filter) to (H, W//2+1), so every size, odd ones included, is accepted.
    """

    def __init__(
        self,
        dim: int,
        *,
        filter_size: int | Sequence[int] | None = None,
        input_resolution: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim)
        if input_resolution is not None:
            height, width = check_resolution("input_resolution", input_resolution)
            derived = (height, width // 2 + 1)
            if filter_size is not None and check_resolution("filter_size", filter_size) != derived:
                raise ValueError(
                    f"filter_size={check_resolution('filter_size', filter_size)} disagrees with "
                    f"input_resolution={(height, width)}, "
                    f"which needs (H, W//2+1)={derived}; give one of them"
                )
            filter_size = derived
        self.filter_size = check_resolution("filter_size", (14, 8) if filter_size is None else filter_size)
        self.complex_weight = nn.Parameter(torch.randn(*self.filter_size, dim, 2) * 0.02)

    def spectral_filter(self, height: int, width: int) -> torch.Tensor:
        """The real view ``(H, W//2+1, C, 2)`` of the filter for an ``height``×``width`` input."""
        size = (height, width // 2 + 1)
        weight = self.complex_weight
        if tuple(weight.shape[:2]) == size:
            return weight
        resized = F.interpolate(weight.permute(2, 3, 0, 1), size=size, mode="bilinear", align_corners=True)
        return resized.permute(2, 3, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = torch.view_as_complex(self.spectral_filter(height, width).to(dtype).contiguous())
        spectrum = torch.fft.rfft2(x.to(dtype), dim=(1, 2), norm="ortho")
        y = torch.fft.irfft2(spectrum * weight, s=(height, width), dim=(1, 2), norm="ortho")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, filter_size={self.filter_size}"
