"""Multi-dimensional Hyena: gated, implicitly parametrised long 2-D convolutions evaluated with the FFT."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import compute_dtype
from ._base import Mechanism, check_int, cpu_blocks
from .registry import register_mechanism

__all__ = ["HyenaND", "fft_conv2d"]


def fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c·7^d ≥ n (pocketfft's fast radices; e.g. 224 for 223, where the 5-smooth 225 is
    about 1.4× slower)."""
    size = n
    while True:
        rest = size
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def fft_conv2d(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Non-circular 'same' 2-D convolution of ``u [B, C, H, W]`` with a full-offset kernel ``[C, 2H−1, 2W−1]``.

    ``y[c, i, j] = Σ_{i', j'} kernel[c, i−i'+H−1, j−j'+W−1]·u[c, i', j']``. Every needed index ``i−i'+H−1`` lies in
    ``0..2H−2``, so a zero-padded real FFT of size ≥ ``2H−1`` per axis never wraps around for the kept outputs
    (rounded up to a fast FFT length). O(N log N) per channel.
    """
    height, width = u.shape[-2:]
    size = (fft_size(2 * height - 1), fft_size(2 * width - 1))
    full = torch.fft.irfft2(torch.fft.rfft2(u, s=size) * torch.fft.rfft2(kernel, s=size), s=size)
    return full[..., height - 1 : 2 * height - 1, width - 1 : 2 * width - 1]


class Sin(nn.Module):
    """Hyena's periodic activation ``sin(w·x)`` with a learned per-feature frequency ``w``."""

    def __init__(self, width: int, frequency: float = 1.0) -> None:
        super().__init__()
        self.frequency = nn.Parameter(frequency * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.frequency * x)


@register_mechanism(
    "hyena_nd",
    family="conv",
    paper="Multi-Dimensional Hyena for Spatial Inductive Bias",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="paper equations and text (no official code read; see note)",
    is_attention=False,
    note=(
        "From the paper's description and Hyena's HyenaFilter (no official Hyena-ND code read): order-N recurrence "
        "y ← x_n ⊙ (h_n ∗ y + D_n ⊙ y) starting from v, with in_proj to (N+1)·dim channels and a 3×3 depthwise "
        "short filter; each h_n is an implicit 2-D filter over all offsets (−(H−1)..H−1)×(−(W−1)..W−1), produced by "
        "an FFN with Sin activations from Fourier features of the normalised offset and multiplied by Hyena's "
        "exponential-decay window exp(−|δ_c|·r) (r = normalised distance; δ from log(1e-2)/0.3 to log(1e-2)/1.5 over "
        "channels). Long convolutions are zero-padded (non-circular) FFT convolutions: O(N log N) tokens."
    ),
    test_kwargs={"filter_hidden": 16},
    test_size=(5, 6),
    size_args={"kernel_size": "kernel"},
)
class HyenaND(Mechanism):
    """Hyena-2D (Zimerman & Wolf, "Multi-Dimensional Hyena for Spatial Inductive Bias", AISTATS 2024).

    Data-controlled gating interleaved with global 2-D convolutions whose kernels are generated from positions
    (implicit filters), so the parameter count does not grow with the image size.

    Args:
        dim: channels in/out.
        order: the Hyena order N (number of gate–convolution steps).
        filter_hidden: width of the filter-generating FFN.
        num_bands: Fourier frequencies per axis in the positional features.
        kernel_size: depthwise short filter on the projections.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        order: int = 2,
        filter_hidden: int = 64,
        num_bands: int = 8,
        kernel_size: int = 3,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.order = check_int("order", order)
        check_int("filter_hidden", filter_hidden)
        self.num_bands = check_int("num_bands", num_bands)
        check_int("kernel_size", kernel_size, odd=True)
        width = (order + 1) * dim
        self.in_proj = nn.Linear(dim, width)
        self.short_filter = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        features = 2 + 4 * num_bands
        self.filter_mlp = nn.Sequential(
            nn.Linear(features, filter_hidden),
            Sin(filter_hidden),
            nn.Linear(filter_hidden, filter_hidden),
            Sin(filter_hidden),
            nn.Linear(filter_hidden, order * dim, bias=False),
        )
        target = math.log(1e-2)
        self.register_buffer("decay", torch.linspace(target / 1.5, target / 0.3, dim).abs(), persistent=False)
        self.skip = nn.Parameter(torch.randn(order, dim))
        self.out_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def axis_features(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[len, 1 + 2·num_bands]`` positional features ``δ, sin(kπδ), cos(kπδ)`` (``k = 1..num_bands``) of the
        normalised offsets ``δ`` of one axis."""
        bands = torch.arange(1, self.num_bands + 1, device=offsets.device, dtype=offsets.dtype) * math.pi
        angles = offsets[:, None] * bands
        return torch.cat([offsets[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)

    def filters(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The implicit long filters ``[order, dim, 2H−1, 2W−1]`` for an ``H×W`` grid (index = offset + extent−1).

        The FFN input at offset ``(δy, δx)`` is ``[δy, δx, sin(kπδy), sin(kπδx), cos(kπδy), cos(kπδx)]``; its first
        linear layer is evaluated per axis (``W_y·f(δy) + W_x·f(δx) + b``: one broadcast add per offset instead of a
        matmul over all features), and the last one channel-first, so the filters come out ready for the FFT.
        """
        device = self.skip.device
        dy, dx = (torch.arange(-(n - 1), n, device=device, dtype=dtype) / max(n - 1, 1) for n in (height, width))
        first, *middle, last = self.filter_mlp
        bands = self.num_bands
        sines, cosines = first.weight[:, 2 : 2 + 2 * bands], first.weight[:, 2 + 2 * bands :]
        row_weight, col_weight = (
            torch.cat([first.weight[:, axis : axis + 1], sines[:, axis * bands : (axis + 1) * bands],
                       cosines[:, axis * bands : (axis + 1) * bands]], dim=1)
            for axis in (0, 1)
        )  # fmt: skip
        rows, cols = (self.axis_features(d).to(first.weight.dtype) for d in (dy, dx))
        hidden = ((rows @ row_weight.T + first.bias)[:, None] + (cols @ col_weight.T)[None, :]).flatten(0, 1)
        for layer in middle:
            hidden = layer(hidden)  # [offsets, filter_hidden]
        kernel = torch.mm(last.weight, hidden.T).to(dtype).view(self.order, self.dim, -1)  # [order, dim, offsets]
        distance = torch.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2) / math.sqrt(2)
        window = torch.exp(-self.decay.to(dtype)[:, None] * distance.flatten())  # Hyena's decay, [dim, offsets]
        return (kernel * window).view(self.order, self.dim, 2 * height - 1, 2 * width - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        ct = compute_dtype(x.dtype)
        projected = self.short_filter(self.in_proj(x).permute(0, 3, 1, 2)).to(ct)
        *gates, y = projected.chunk(self.order + 1, dim=1)
        kernels = self.filters(height, width, ct)
        skip = self.skip.to(ct)
        # Channel blocks whose complex spectra (per channel: batch · FFT rows · FFT columns/2+1) fit a CPU cache, so
        # each block's transforms, product and gating run in cache.
        spectrum = x.shape[0] * fft_size(2 * height - 1) * (fft_size(2 * width - 1) // 2 + 1) * 2 * y.element_size()
        blocks = cpu_blocks(self.dim, spectrum, y.device)
        for n in range(self.order):
            steps = [
                gates[n][:, c] * (fft_conv2d(y[:, c], kernels[n, c]) + skip[n, c, None, None] * y[:, c]) for c in blocks
            ]
            y = steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)
        return self.proj_drop(self.out_proj(y.permute(0, 2, 3, 1).to(x.dtype)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}"
