"""MSA-Conv (Transformer in Convolution): self-attention inside every sliding convolution window."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import neighborhood_attention
from ._base import (
    Mechanism,
    check_int,
    merge_heads,
    reject_attn_drop,
    resolve_heads,
    split_qkv,
)
from ._channel_conv import to_nchw, to_nhwc
from ._windows import Padding
from .registry import register_mechanism


@register_mechanism(
    "msa_conv",
    family="conv",
    paper="TiC: Exploring Vision Transformer in Convolution (MSA-Conv)",
    year=2023,
    complexity="N·k",
    reference="official StriveZs/MSA-Conv (core/op/Transformer_in_Convolution.py MSA_Conv_2d; msa_conv_v1_1.py, "
    "msa_conv_cuda.cu)",
    receptive_field="local",
    note="implements the official MSA_Conv_2d: 1×1 qkv conv; each pixel's query attends to the k×k (dilated) window "
    "centred on it with zero padding, the zero keys outside the map taking part with logit 0 and value 0 "
    "(mask_padding=True drops them instead); scale dim^-½ (one head, as the official op; num_heads > 1 splits the "
    "channels); then the input is added and a k×k conv ('mlp', no bias) and ReLU follow. The official CUDA im2col "
    "op is replaced by neighborhood attention on a zero-padded canvas (the window stays centred). No cyclic shift "
    "or inter-window pooling exists in the official code",
    test_kwargs={"kernel_size": 3},
    test_size=(8, 8),
    size_args={"kernel_size": "span"},
)
class MSAConv(Mechanism):
    """MSA-Conv (Zhang et al., TiC 2023): a convolution whose per-window aggregation is self-attention.

    ``y = ReLU(Conv_k(x + Σ_{j∈W_k(i)} softmax_j(q_i·k_j / √d) v_j))`` with q, k, v from a 1×1 conv and ``W_k(i)``
    the ``kernel_size`` window (at ``dilation``) centred on pixel i, zero-padded at the borders like a
    convolution. A drop-in for a k×k conv layer (the residual and ReLU are part of the official op).

    Args:
        dim: channels. kernel_size: odd window (3). dilation: window dilation (1). num_heads: heads (1, as the
        official op). mask_padding: drop the zero-padded keys instead of letting them take part. attn_drop: must be
        0. backend: engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        num_heads: int = 1,
        mask_padding: bool = False,
        attn_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=3, odd=True)
        self.dilation = check_int("dilation", dilation)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.mask_padding = bool(mask_padding)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        border = self.dilation * (self.kernel_size // 2)
        padding = Padding(spatial, (border, border), (border, border))  # a centred window never clamps
        q, k, v = (padding.pad(t) for t in split_qkv(self.qkv(x), self.num_heads))
        key_bias = padding.key_bias(q.dtype, q.device) if self.mask_padding else None
        out = neighborhood_attention(
            q, k, v, self.kernel_size, dilation=self.dilation, key_bias=key_bias, backend=self.backend
        )
        attended = merge_heads(padding.crop(out)) + x
        return to_nhwc(F.relu(self.mlp(to_nchw(attended))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, dilation={self.dilation}, num_heads={self.num_heads}"
