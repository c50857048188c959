"""HorNet recursive gated convolution gⁿConv: n-th order spatial interactions from convs and products."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ._base import Mechanism, check_choice, check_divisible, check_int
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism
from .spectral_gating import SpectralGating


class GlobalLocalFilter(nn.Module):
    """HorNet's global-local filter (NCHW): LayerNorm; half the channels a 3×3 depthwise conv (no bias), the other
    half a global Fourier filter (``spectral_gating``, resized to the input); channels interleaved
    (local₀, global₀, local₁, …); LayerNorm. Both norms are over channels with eps 1e-6, as in HorNet."""

    def __init__(self, channels: int, filter_size: Sequence[int]) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"the global-local filter needs an even channel count, got {channels}")
        half = channels // 2
        self.pre_norm = nn.LayerNorm(channels, eps=1e-6)
        self.dw = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.global_filter = SpectralGating(half, filter_size=filter_size)
        self.post_norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, spectral = self.pre_norm(to_nhwc(x)).chunk(2, dim=-1)
        local = to_nhwc(self.dw(to_nchw(local)))
        mixed = rearrange([local, self.global_filter(spectral)], "two b h w c -> b h w (c two)")
        return to_nchw(self.post_norm(mixed))


@register_mechanism(
    "recursive_gated_conv",
    family="conv",
    receptive_field="local",
    paper="HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions",
    year=2022,
    complexity="linear",
    is_attention=False,
    reference="mmpretrain.models.backbones.hornet.gnConv(dim, order, dw_cfg=dict(type='DW', kernel_size=7), "
    "scale=1/3); official raoyongming/HorNet hornet.py::gnconv",
    size_args={"kernel_size": "kernel"},
)
class RecursiveGatedConv(Mechanism):
    """Recursive gated convolution gⁿConv (Rao et al., NeurIPS 2022), a product of n+1 linear maps of x.

    Widths C_k = C / 2^{n−1−k} (k = 0..n−1). [p₀, q] = Conv1×1(C→2C)(x) split as (C₀, ΣC_k);
    q ← ``scale``·DWConv_k×k(q); q = [q₀..q_{n−1}]; p = p₀⊙q₀; p = Conv1×1(C_{k−1}→C_k)(p)⊙q_k for k ≥ 1;
    y = Conv1×1(C→C)(p). All convs carry a bias; with zero biases y(a·x) = a^{n+1} y(x). The receptive field is the
    depthwise kernel. ``order=3`` is HorNet's stage-2 setting (stages use 2, 3, 4, 5); C must be divisible by 2^{n−1}.
    ``dw='gf'`` swaps the depthwise conv for HorNet-GF's global-local filter (``filter_size`` sizes its Fourier
    weights, resized to any input), which makes the receptive field global and adds LayerNorms (no homogeneity).
    """

    def __init__(
        self,
        dim: int,
        *,
        order: int = 3,
        kernel_size: int = 7,
        scale: float = 1 / 3,
        dw: str = "dw",
        filter_size: Sequence[int] = (14, 8),
    ) -> None:
        super().__init__(dim)
        self.dw = check_choice("dw", dw, ("dw", "gf"))
        self.order = check_int("order", order)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        check_divisible("dim", dim, "2**(order-1)", 2 ** (order - 1))
        self.scale = float(scale)
        self.dims = [dim // 2 ** (order - 1 - k) for k in range(order)]
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        gated = sum(self.dims)
        if dw == "gf":
            if gated % 2:
                raise ValueError(
                    f"dw='gf' halves the {gated} gate channels: dim={dim} with order={order} gives an odd count; "
                    f"use a dim divisible by 2**order={2**order}"
                )
            self.dwconv = GlobalLocalFilter(gated, filter_size)
        else:
            self.dwconv = nn.Conv2d(gated, gated, kernel_size, padding=kernel_size // 2, groups=gated)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[k], self.dims[k + 1], 1) for k in range(order - 1))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        p, q = self.proj_in(to_nchw(x)).split((self.dims[0], sum(self.dims)), dim=1)
        gates = (self.dwconv(q) * self.scale).split(self.dims, dim=1)
        p = p * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            p = pw(p) * gate
        return to_nhwc(self.proj_out(p))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}, dw={self.dw!r}, kernel_size={self.kernel_size}, scale={self.scale:.4g}"
