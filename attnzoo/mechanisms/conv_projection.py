"""CvT convolutional projection: depthwise-conv + BN token maps feed the q/k/v projections (Wu et al., ICCV 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, merge_heads, resolve_heads
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


class _DepthwiseBN(nn.Sequential):
    """Depthwise conv (no bias) then BatchNorm on NCHW maps: CvT's "dw_bn" projection."""

    def __init__(self, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False),
            nn.BatchNorm2d(dim),
        )


@register_mechanism(
    "conv_projection",
    family="global",
    paper="CvT: Introducing Convolutions to Vision Transformers",
    year=2021,
    complexity="quadratic",
    reference="transformers.models.cvt.modeling_cvt.CvtAttention(with_cls_token=False, qkv_projection_method="
    "'dw_bn', stride_kv=2); official microsoft/CvT lib/models/cls_cvt.py::Attention (read)",
    note="Logits are scaled by dim**-0.5 (the whole embedding width), as the official code and transformers do, "
    "not by head_dim**-0.5. The class token of CvT's last stage is not modelled (channels-last maps have none).",
    test_kwargs={"num_heads": 2},
    size_args={"kernel_size": "kernel", "sr_ratio": "ratio"},
)
class ConvProjectionAttention(Mechanism):
    """Convolutional-projection MHSA (Wu et al., CvT, ICCV 2021).

    q, k and v are each made by a ``kernel_size``² depthwise conv (stride 1 for q, ``sr_ratio`` for k and v, zero
    padding ``kernel_size // 2``, no bias) → BatchNorm → a linear projection; softmax attention of every query over
    the ⌈H/s⌉·⌈W/s⌉ keys with scale ``dim**-0.5``, then an output projection.

    Args:
        dim: channels.
        num_heads: attention heads (default ``dim // 64``, at least 1: CvT's heads have width 64).
        head_dim: per-head width (alternative to ``num_heads``).
        kernel_size: side of the depthwise projection convs (3).
        sr_ratio: stride of the key/value convs (2 in CvT).
        qkv_bias: biases of the q/k/v linear projections (True in CvT).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        kernel_size: int = 3,
        sr_ratio: int = 2,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, default_head_dim=64)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.sr_ratio = check_int("sr_ratio", sr_ratio)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        inner = self.num_heads * self.head_dim
        self.scale = dim**-0.5
        self.conv_q = _DepthwiseBN(dim, kernel_size, 1)
        self.conv_k = _DepthwiseBN(dim, kernel_size, sr_ratio)
        self.conv_v = _DepthwiseBN(dim, kernel_size, sr_ratio)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.k = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        image = to_nchw(x)
        heads = dict(h=self.num_heads)
        q = rearrange(self.q(to_nhwc(self.conv_q(image))), "b y x (h d) -> b y x h d", **heads)
        k = rearrange(self.k(to_nhwc(self.conv_k(image))), "b y x (h d) -> b y x h d", **heads)
        v = rearrange(self.v(to_nhwc(self.conv_v(image))), "b y x (h d) -> b y x h d", **heads)
        out = attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"sr_ratio={self.sr_ratio}"
        )
