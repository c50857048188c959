"""Dynamic Spectrum Mixer: token mixing by content-reweighted filters on the 2-D DCT spectrum."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, cached_table, check_int
from .registry import register_mechanism


@lru_cache(maxsize=32)
def dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (float64, ``size × size``): ``D[k, n] = s_k cos(π (n + ½) k / size)``."""
    n = torch.arange(size, dtype=torch.float64)
    table = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / size) * math.sqrt(2.0 / size)
    table[0] /= math.sqrt(2.0)
    return table


@register_mechanism(
    "dynamic_spectrum",
    family="spectral",
    paper="Dynamic Spectrum Mixer for Visual Recognition",
    year=2023,
    complexity="linear",
    is_attention=False,
    reference="no official code found; the dynamic filter construction follows DFFormer's DynamicFilter "
    "(Tatsunami & Taki, FFT-based Dynamic Token Mixer for Vision, AAAI 2024) with the DCT in place of the FFT",
    note="The definition is uncertain (no official code was found). Implemented from the DSM abstract: y = W_out · IDCT2(DCT2(GELU(W_in x)) ⊙ Σ_k a_k(x) F_k), with "
    "orthonormal DCT-II along H and W, num_filters learned spectral weight maps F_k (spectrum_size² × width) "
    "resized bilinearly to the input's H×W spectrum, and band-selector weights a(x) = softmax_k(MLP(mean_HW x)) "
    "per channel (the 'dynamic spectrum weight generation layer').",
)
class DynamicSpectrumMixer(Mechanism):
    """Dynamic spectrum mixer (Hu et al., 2023): content-adaptive filtering of the 2-D DCT spectrum.

    Tokens are widened (Linear → GELU), taken to the frequency domain by an orthonormal 2-D DCT (one per channel),
    multiplied by a spectral weight map that is a softmax mixture of ``num_filters`` learned maps with mixture
    weights generated from the globally pooled input (emphasising informative frequency bands per image and
    channel), taken back by the inverse DCT and projected to ``dim``. Every token depends on every token.

    Args:
        dim: channels.
        expansion_ratio: width of the filtered features as a multiple of ``dim`` (2).
        num_filters: learned spectral weight maps mixed per image (4).
        spectrum_size: side of the stored spectral weight maps (14: a 224² image at stride 16); resized to H×W.
        reweight_ratio: hidden width of the weight generator as a multiple of ``dim`` (0.25).
    """

    def __init__(
        self,
        dim: int,
        *,
        expansion_ratio: float = 2.0,
        num_filters: int = 4,
        spectrum_size: int = 14,
        reweight_ratio: float = 0.25,
    ) -> None:
        super().__init__(dim)
        width = int(expansion_ratio * dim)
        hidden = int(reweight_ratio * dim)
        if width < 1 or hidden < 1:
            raise ValueError(
                f"expansion_ratio={expansion_ratio} and reweight_ratio={reweight_ratio} must give widths >= 1 for "
                f"dim={dim}, got {width} and {hidden}"
            )
        self.num_filters = check_int("num_filters", num_filters)
        self.spectrum_size = check_int("spectrum_size", spectrum_size)
        self.width = width
        self.pwconv1 = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.reweight = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_filters * width))
        self.spectral_weight = nn.Parameter(torch.randn(num_filters, width, spectrum_size, spectrum_size) * 0.02 + 1.0)
        self.pwconv2 = nn.Linear(width, dim)

    def band_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, width, H, W)`` spectral weights for input ``x`` ``(B, H, W, dim)``."""
        height, width = x.shape[1:3]
        routing = self.reweight(x.mean(dim=(1, 2))).reshape(-1, self.num_filters, self.width).softmax(dim=1)
        maps = self.spectral_weight
        if (height, width) != (self.spectrum_size, self.spectrum_size):
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)
        return torch.einsum("bkc,kchw->bchw", routing, maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        if height == 0 or width == 0:
            raise ValueError(f"DynamicSpectrumMixer pools and transforms the map; x.shape={tuple(x.shape)} is empty")
        dct_h = cached_table(dct_matrix, height).to(x)
        dct_w = cached_table(dct_matrix, width).to(x)
        z = self.act(self.pwconv1(x))
        spectrum = torch.einsum("kh,bhwc,lw->bklc", dct_h, z, dct_w)
        spectrum = spectrum * self.band_weights(x).permute(0, 2, 3, 1)
        mixed = torch.einsum("kh,bklc,lw->bhwc", dct_h, spectrum, dct_w)
        return self.pwconv2(mixed)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, num_filters={self.num_filters}, spectrum_size={self.spectrum_size}"
