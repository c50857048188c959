"""EfficientViT cascaded group attention (CGA): each head sees its own channel chunk plus the previous head's output."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_divisible, check_int, inference_cached, renamed_kwargs
from ._windows import pad_to_multiple
from .registry import register_mechanism
from .single_head import ConvBN

__all__ = ["CascadedGroupAttention", "absolute_offset_index"]


def absolute_offset_index(window: int) -> torch.Tensor:
    """``[R², R²]`` index ``|Δy|·R + |Δx|`` into a per-head table of ``R²`` biases (EfficientViT's offsets)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


@register_mechanism(
    "cascaded_group",
    family="head-mixing",
    receptive_field="local",
    paper="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
    year=2023,
    native_rank=2,
    complexity="N·k",
    reference="timm.models.efficientvit_msra.LocalWindowAttention / CascadedGroupAttention (NCHW; keys attn.qkvs.i, "
    "attn.dws.i (conv = our c), attn.proj.1, attn.attention_biases)",
    test_kwargs={"num_heads": 4, "qk_dim": 4, "window_size": 4, "kernel_size": 3},
    test_size=(6, 8),
    size_args={"window_size": "extent", "kernel_size": "kernel"},
)
class CascadedGroupAttention(Mechanism):
    """Cascaded group attention (Liu et al., EfficientViT, 2023) in ``window_size``² windows on a 2-D grid.

    The channels split into ``num_heads`` chunks ``x_j``; head j reads ``f_j = x_j + o_{j−1}`` (``f₁ = x₁``):
    ``[q, k, v] = BN(Conv1×1(f_j))`` (widths qk_dim, qk_dim, C/h), ``q ← BN(DWConv_{K_j}(q))``,
    ``o_j = softmax(qk_dim^-1/2 · q kᵀ + b_j[|Δy|, |Δx|]) v``; ``y = BN(Conv1×1(ReLU([o₁..o_h])))`` (BN weight 0 at
    init, so zero output). The grid is zero-padded at bottom/right to a multiple of the window; with
    ``mask_padding=True`` padded tokens are masked as keys, ``False`` lets them attend as in timm/official code.
    """

    @renamed_kwargs(key_dim="qk_dim", window_resolution="window_size", kernels="kernel_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 4,
        qk_dim: int = 16,
        window_size: int = 7,
        kernel_size: int | Sequence[int] = 5,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        check_divisible("dim", dim, "num_heads", check_int("num_heads", num_heads))
        check_int("qk_dim", qk_dim)
        check_int("window_size", window_size)
        kernel_size = (kernel_size,) * num_heads if isinstance(kernel_size, int) else tuple(kernel_size)
        odd = all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in kernel_size)
        if len(kernel_size) != num_heads or not odd:
            raise ValueError(
                f"kernel_size={kernel_size!r} must be one odd positive int per head (num_heads={num_heads})"
            )
        self.num_heads, self.qk_dim, self.window_size = num_heads, qk_dim, window_size
        self.kernel_size, self.mask_padding = kernel_size, bool(mask_padding)
        self.val_dim = dim // num_heads
        self.qkvs = nn.ModuleList(ConvBN(self.val_dim, 2 * qk_dim + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvBN(qk_dim, qk_dim, k, groups=qk_dim) for k in kernel_size)
        self.proj = ConvBN(dim, dim, bn_weight_init=0.0)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size**2))
        self.register_buffer("bias_index", absolute_offset_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        r = self.window_size
        padding = pad_to_multiple((height, width), (r, r))
        # windows as NCHW views of channels-last memory: the 1×1 convs, BNs and the cascade sums then all run on
        # channels-last data (a channels-first copy makes each conv ~1.7× and each mixed-layout sum ~3× slower)
        windows = rearrange(padding.pad(x), "b (nh r) (nw s) c -> (b nh nw) r s c", r=r, s=r).permute(0, 3, 1, 2)
        bias = inference_cached(  # [heads, R², R²]
            self,
            "_bias_cache",
            (x.dtype, x.device),
            lambda: self.attention_biases.to(x.dtype)[:, self.bias_index],
            self.attention_biases,
        )
        key_bias = padding.key_bias(x.dtype, x.device) if self.mask_padding else None
        if key_bias is not None:  # [1, Hp, Wp, 1] → one row per window, repeated over the batch: [B·nW, 1, 1, R²]
            key_bias = rearrange(key_bias, "1 (nh r) (nw s) 1 -> (nh nw) 1 1 (r s)", r=r, s=r)
            key_bias = key_bias.repeat(x.shape[0], 1, 1, 1)
        outputs = []
        feat = None
        for head, (qkv, dw, chunk) in enumerate(zip(self.qkvs, self.dws, windows.chunk(self.num_heads, dim=1))):
            feat = chunk if feat is None else feat + chunk
            q, k, v = qkv(feat).split([self.qk_dim, self.qk_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = (rearrange(u, "w c r s -> w (r s) 1 c") for u in (q, k, v))
            mask = bias[head] if key_bias is None else bias[head] + key_bias
            out = attention(q, k, v, scale=self.qk_dim**-0.5, attn_mask=mask)
            feat = rearrange(out, "w (r s) 1 c -> w c r s", r=r)
            outputs.append(feat)
        y = self.proj(torch.relu(torch.cat(outputs, dim=1)))
        y = rearrange(y, "(b nh nw) c r s -> b (nh r) (nw s) c", b=x.shape[0], nh=padding.padded_shape[0] // r)
        return padding.crop(y)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
            f"window_size={self.window_size}, kernel_size={self.kernel_size}, mask_padding={self.mask_padding}"
        )
