"""HAT's hybrid attention: window self-attention plus a small-weighted convolutional channel-attention branch."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._base import Mechanism, check_int
from ._channel_conv import reduced_width, to_nchw, to_nhwc
from .registry import register_mechanism
from .window import WindowAttention


class ChannelAttentionBlock(nn.Module):
    """HAT's CAB on channels-last maps: Conv3×3 (C → C/compress) → GELU → Conv3×3 (→ C) → RCAN channel attention
    x ⊙ σ(W₂ ReLU(W₁ GAP(x))) with ``max(min_width, C // reduction)`` hidden units."""

    def __init__(self, dim: int, compress_ratio: int, reduction: int, min_width: int) -> None:
        super().__init__()
        hidden = max(1, dim // check_int("compress_ratio", compress_ratio))
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1)
        squeeze = max(check_int("min_width", min_width), reduced_width(dim, reduction))
        self.fc1 = nn.Linear(dim, squeeze)
        self.fc2 = nn.Linear(squeeze, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = to_nhwc(self.conv2(self.act(self.conv1(to_nchw(x)))))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(feat.mean(dim=(1, 2), keepdim=True)))))
        return feat * gate


@register_mechanism(
    "hybrid_attention_block",
    family="local",
    paper="Activating More Pixels in Image Super-Resolution Transformer (HAT)",
    year=2023,
    complexity="N·k",
    reference="official XPixelGroup/HAT hat/archs/hat_arch.py::HAB (attention and CAB branches; read)",
    note="Returns attn_x + conv_scale·CAB(x), what HAB adds to its shortcut. CAB's conv width is max(1, dim // 3) "
    "and its channel gate has max(min_width=4, dim // 30) hidden units: HAT's dim // 30 at its own widths (180 and "
    "144 give 6), but a single ReLU unit at dim 32 could start inactive and cut the gate's global path. The "
    "window branch is attnzoo's 'window' (Swin's shifted windows).",
    test_kwargs={"num_heads": 2, "window_size": 4, "shift_size": 2},
    size_args={"window_size": "extent"},
)
class HybridAttentionBlock(Mechanism):
    """Hybrid attention block of HAT (Chen et al., CVPR 2023): W-MSA(x) + α · CAB(x).

    The attention branch is Swin (shifted) window attention with a relative position bias; the channel-attention
    block CAB is Conv3×3 → GELU → Conv3×3 → x ⊙ σ(W₂ ReLU(W₁ GAP(x))) (RCAN), weighted by the small ``conv_scale`` α
    so that it activates more pixels without destabilising the attention branch.

    Args:
        dim: channels.
        num_heads: window-attention heads (default ``dim // 32``; HAT: 6 heads of 30 channels).
        head_dim: per-head width (alternative to ``num_heads``).
        window_size: side of the attention windows (16 in HAT).
        shift_size: window shift (HAT alternates 0 and window_size // 2).
        compress_ratio: channel compression of CAB's first conv (3).
        reduction: squeeze ratio of CAB's channel attention (30).
        min_width: fewest hidden units of that channel attention (4; HAT's widths give 6).
        conv_scale: weight α of the CAB branch (0.01).
        qkv_bias: biases of the q/k/v projection.
        proj_drop: dropout after the attention output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | Sequence[int] = 16,
        shift_size: int | Sequence[int] = 0,
        compress_ratio: int = 3,
        reduction: int = 30,
        min_width: int = 4,
        conv_scale: float = 0.01,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        if isinstance(conv_scale, bool) or not isinstance(conv_scale, (int, float)):
            raise ValueError(f"conv_scale={conv_scale!r} must be a number")
        self.conv_scale = float(conv_scale)
        self.attn = WindowAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            window_size=window_size,
            shift_size=shift_size,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
        )
        self.conv_block = ChannelAttentionBlock(dim, compress_ratio, reduction, min_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.attn(x) + self.conv_scale * self.conv_block(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, conv_scale={self.conv_scale}"
