"""Multi-head self-attention (ViT)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_probability, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["MultiHeadSelfAttention"]


@register_mechanism(
    "mhsa",
    family="global",
    paper="An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
    year=2020,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="timm.layers.Attention; torch.nn.MultiheadAttention(batch_first=True)",
    test_kwargs={"num_heads": 4},
    test_size=(12,),
)
class MultiHeadSelfAttention(Mechanism):
    """Multi-head self-attention over all tokens (Vaswani et al. 2017; ViT, Dosovitskiy et al. 2020).

    ``[q, k, v] = qkv(x)``; per head ``softmax(d^-1/2 · q kᵀ + mask) v``; heads concatenated and projected.
    Takes ``(B, N, C)`` or flattens ``(B, *spatial, C)`` row-major and returns the input's shape.
    ``forward(x, attn_mask=None)``: a boolean (True = attend) or additive mask broadcasting to ``[B, heads, N, N]``.
    ``qk_norm`` applies a LayerNorm over ``head_dim`` to q and k (timm's option).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        is_causal: bool = False,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal={is_causal!r} must be a bool")
        self.is_causal = is_causal
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.is_causal, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = self.proj_drop(self.proj(merge_heads(out)))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, is_causal={self.is_causal}"
