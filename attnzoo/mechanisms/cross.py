"""Generic cross-attention: queries from x, keys and values from a context sequence."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, flatten_tokens, merge_heads, resolve_heads
from .registry import register_mechanism

__all__ = ["CrossAttention"]


@register_mechanism(
    "cross",
    family="cross",
    paper="Attention Is All You Need",
    year=2017,
    layout="cross",
    native_rank=1,
    complexity="quadratic",
    reference="torch.nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)",
    test_kwargs={"num_heads": 4},
    test_size=(12,),
)
class CrossAttention(Mechanism):
    """Multi-head cross-attention of x over a context sequence (Vaswani et al., 2017).

    ``q = q(x)``, ``[k, v] = kv(context)``; per head ``softmax(d^-1/2 · q kᵀ + mask) v``; heads concatenated and
    projected back to ``dim``. ``forward(x, context=None, key_padding_mask=None)``: x is ``(B, N, C)`` or
    ``(B, *spatial, C)`` (flattened row-major, output in x's shape), context ``(B, M, context_dim)`` or spatial
    (flattened), ``None`` meaning self-attention; ``key_padding_mask`` ``(B, M)`` boolean, True = padding (ignored).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        if context_dim is not None:
            check_int("context_dim", context_dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.context_dim = dim if context_dim is None else context_dim
        self.attn_drop = check_probability("attn_drop", attn_drop)
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(self.context_dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def check_context(self, context: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor or None, got {type(context).__name__}")
        if context.dim() < 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context.shape={tuple(context.shape)} must be "
                f"(batch={x.shape[0]}, tokens, context_dim={self.context_dim})"
            )
        if context.numel() == 0:
            raise ValueError(f"context.shape={tuple(context.shape)} must not be empty")
        if context.dtype != x.dtype:
            raise TypeError(f"context.dtype={context.dtype} must equal x.dtype={x.dtype}")

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.check_input(x)
        if context is None:
            if self.context_dim != self.dim:
                raise ValueError(f"context=None needs context_dim={self.context_dim} to equal dim={self.dim}")
            context = x
        self.check_context(context, x)
        ctx = flatten_tokens(context)
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != ctx.shape[:2] or key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of shape {tuple(ctx.shape[:2])}, "
                    f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            mask = ~key_padding_mask[:, None, None, :]  # True = attend, [B, 1, 1, M]
        q = rearrange(self.q(flatten_tokens(x)), "b n (h d) -> b n h d", h=self.num_heads)
        k, v = rearrange(self.kv(ctx), "b m (two h d) -> two b m h d", two=2, h=self.num_heads)
        out = attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(merge_heads(out)))
        return out.reshape(*x.shape[:-1], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
