"""Multi-head self-attention (ViT), and the sequence helpers the other global mechanisms share."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, resolve_heads
from .registry import register_mechanism

__all__ = ["MultiHeadSelfAttention", "softmax_attention", "flatten_tokens", "check_dropout", "cached_table"]


def check_dropout(name: str, p: float) -> float:
    """``p`` as a float in [0, 1), or a ValueError naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p!r} must be a probability in [0, 1)")
    return float(p)


def cached_table(fn, *args):
    """``fn(*args)`` for an ``lru_cache``-wrapped geometry table; while compiling, the unwrapped function (Dynamo
    traces it into constants anyway and would warn about the cache wrapper)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, *spatial, C)`` → ``(B, N, C)``, row-major (last spatial axis fastest)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``attnzoo.ops.attention`` on ``[B, N, heads, d]`` tensors, with dropout on the attention weights."""
    return attention(q, k, v, scale=scale, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


@register_mechanism(
    "mhsa",
    family="global",
    paper="An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
    year=2020,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="timm.layers.Attention; torch.nn.MultiheadAttention(batch_first=True)",
    causal_capable=True,
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
        self.attn_drop = check_dropout("attn_drop", attn_drop)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal={is_causal!r} must be a bool")
        self.is_causal = is_causal
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = softmax_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.is_causal, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = self.proj_drop(self.proj(rearrange(out, "b n h d -> b n (h d)")))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, is_causal={self.is_causal}"
