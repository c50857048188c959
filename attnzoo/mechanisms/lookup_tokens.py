"""LookupViT: a few compressed tokens read all tokens by cross-attention, mix, and write back with the same map."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_positive, check_probability, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["LookupTokensAttention"]


@register_mechanism(
    "lookup_tokens",
    family="summary-token",
    paper="LookupViT: Compressing Visual Information to a Limited Number of Tokens",
    year=2024,
    complexity="linear",
    reference="vit_pytorch.look_vit (LookViT layer: lookup cross-attention, attention, MLP, attention-reuse)",
    receptive_field="global",
    note=(
        "One LookViT layer as a mixer, as vit-pytorch's look_vit: the compressed tokens are the input bilinearly "
        "resized to a √num_tokens × √num_tokens grid (vit-pytorch resizes once per model and carries them from layer "
        "to layer; here every block derives them from its input); they cross-attend to all tokens (logits S), then "
        "self-attend and pass an MLP, each with a residual; the output is the reverse cross-attention of all tokens "
        "over the compressed ones with the transposed logits Sᵀ (attention reuse) and its own values. The high-res "
        "LayerNorm and MLP of the look_vit layer are the block's. LayerNorms are bias-free, as vit-pytorch's."
    ),
    test_kwargs={"num_heads": 2, "num_tokens": 4},
    test_size=(6, 6),
)
class LookupTokensAttention(Mechanism):
    """Lookup tokens (Koner et al., LookupViT, 2024): bidirectional cross-attention through compressed tokens, O(N·M).

    Input ``(B, H, W, C)``; ``M = num_tokens`` compressed tokens.

    Args:
        dim: channels in and out.
        num_heads: heads of the three attentions (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        num_tokens: compressed tokens, a square number (a √M × √M grid).
        mlp_ratio: hidden width of the compressed tokens' MLP over ``dim``.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projections.
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        num_tokens: int = 49,
        mlp_ratio: float = 4.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_int("num_tokens", num_tokens)
        if math.isqrt(num_tokens) ** 2 != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be a square number (the compressed tokens form a grid)")
        check_positive("mlp_ratio", mlp_ratio)
        self.num_tokens, self.side = num_tokens, math.isqrt(num_tokens)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        drop = check_probability("proj_drop", proj_drop)
        inner = self.num_heads * self.head_dim
        norm = lambda: nn.LayerNorm(dim, bias=False)  # noqa: E731
        self.lookup_norm, self.lookup_context_norm = norm(), norm()
        self.lookup_q = nn.Linear(dim, inner, bias=False)
        self.lookup_k = nn.Linear(dim, inner, bias=False)
        self.lookup_v = nn.Linear(dim, inner, bias=False)
        self.lookup_out = nn.Linear(inner, dim, bias=False)
        self.self_norm = norm()
        self.self_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.self_out = nn.Linear(inner, dim, bias=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(norm(), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim))
        self.reuse_context_norm = norm()
        self.reuse_v = nn.Linear(dim, inner, bias=False)
        self.reuse_out = nn.Linear(inner, dim, bias=False)
        self.drop = nn.Dropout(drop)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.softmax(logits, dim=-1), self.attn_drop, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        if rows == 0 or cols == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has an empty spatial axis; lookup_tokens resizes a grid")
        tokens = x.reshape(x.shape[0], rows * cols, self.dim)
        compressed = F.interpolate(x.permute(0, 3, 1, 2), size=self.side, mode="bilinear", align_corners=False)
        compressed = compressed.flatten(2).transpose(1, 2)  # [B, M, C]
        # compressed tokens look up all tokens; the logits are kept for the way back
        context = self.lookup_context_norm(tokens)
        q = self.heads(self.lookup_q(self.lookup_norm(compressed))) * self.head_dim**-0.5
        logits = q @ self.heads(self.lookup_k(context)).transpose(-1, -2)  # [B, h, M, N]
        read = self.weights(logits) @ self.heads(self.lookup_v(context))
        compressed = compressed + self.drop(self.lookup_out(rearrange(read, "b h m d -> b m (h d)")))
        sq, sk, sv = split_qkv(self.self_qkv(self.self_norm(compressed)), self.num_heads)
        mixed = attention(sq, sk, sv, dropout_p=self.attn_drop if self.training else 0.0)
        compressed = compressed + self.drop(self.self_out(merge_heads(mixed)))
        compressed = compressed + self.drop(self.mlp(compressed))
        # all tokens read the compressed ones back through the transposed logits
        values = self.heads(self.reuse_v(self.reuse_context_norm(compressed)))
        written = self.weights(logits.transpose(-1, -2)) @ values  # [B, h, N, d]
        out = self.reuse_out(rearrange(written, "b h n d -> b n (h d)"))
        return self.drop(out).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_tokens={self.num_tokens}"
