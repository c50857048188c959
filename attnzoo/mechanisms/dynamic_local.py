"""DLGSANet multi-head dynamic local self-attention (MHDLSA): depthwise convolution with input-generated kernels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ._base import Mechanism, check_int, resolve_heads
from ._channel_conv import reduced_width, to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "dynamic_local",
    family="conv",
    paper="DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution",
    year=2023,
    complexity="N·k",
    reference="official NeonLeexiang/DLGSANet (basicsr/archs/dlgsanet_arch.py IDynamicDWConvBlock; "
    "dlgsanet_idynamicdwconv_util.py IDynamicDWConv)",
    is_attention=False,
    receptive_field="local",
    note="implements the official IDynamicDWConvBlock: 1×1 conv, then a zero-padded k×k depthwise conv whose "
    "per-pixel kernels come from a hyper-network (1×1 to dim/4, k×k depthwise, 1×1 to k²·heads), no softmax, then "
    "1×1 conv. The official 'heads' argument is the number of channels sharing one kernel (here head_dim); the "
    "CUDA (cupy) kernel is replaced by a shift-and-accumulate loop in PyTorch",
    test_kwargs={"kernel_size": 3},
    test_size=(8, 8),
    size_args={"kernel_size": "kernel"},
)
class DynamicLocalAttention(Mechanism):
    """Multi-head dynamic local self-attention (Li et al., DLGSANet, ICCV 2023), the MHDLSA module.

    ``y = W₁ · DynDW(W₀ x)``: each head (``head_dim`` consecutive channels) is filtered at every pixel by its own
    ``kernel_size²`` kernel, generated from the input by a small hyper-network (1×1 → k×k depthwise → 1×1) in the
    spirit of "local attention = dynamic depthwise convolution" (Han et al., ICLR 2022). Zero padding at borders.

    Args:
        dim: channels. kernel_size: odd extent of the dynamic kernel (7). num_heads, head_dim: kernel groups
        (default ``dim // 8``) and channels per group. reduction: hidden width ``dim // reduction`` of the
        hyper-network (4). bias: bias of the hyper-network convs.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 7,
        num_heads: int | None = None,
        head_dim: int | None = None,
        reduction: int = 4,
        bias: bool = True,
    ) -> None:
        super().__init__(dim)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, default_head_dim=8)
        if self.num_heads * self.head_dim != dim:
            raise ValueError(f"num_heads={self.num_heads} × head_dim={self.head_dim} must equal dim={dim}")
        hidden = reduced_width(dim, reduction)
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.hyper = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=bias),
            nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=bias),
            nn.Conv2d(hidden, kernel_size**2 * self.num_heads, 1, bias=bias),
        )
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.check_input(x)
        k = self.kernel_size
        z = self.conv0(to_nchw(x))
        kernels = rearrange(self.hyper(z), "b (g kh kw) y x -> b g 1 kh kw y x", g=self.num_heads, kh=k)
        padded = rearrange(F.pad(z, (k // 2,) * 4), "b (g c) y x -> b g c y x", g=self.num_heads)
        out = torch.zeros_like(padded[..., :h, :w])
        for i in range(k):  # shift and accumulate: no k²-times larger im2col buffer
            for j in range(k):
                out = out + kernels[:, :, :, i, j] * padded[..., i : i + h, j : j + w]
        return to_nhwc(self.conv1(out.flatten(1, 2)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, num_heads={self.num_heads}"
