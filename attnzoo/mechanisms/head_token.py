"""DHVT head tokens: one pooled token per head's channel group joins the keys and queries of MHSA."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_probability, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["HeadTokenAttention"]


@register_mechanism(
    "head_token",
    family="head-mixing",
    paper="Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small Datasets (DHVT)",
    year=2022,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="ArieSeirack/DHVT vision_transformer.py::HI_Attention (official; read)",
    receptive_field="global",
    note=(
        "As the official HI_Attention: head tokens = GELU(LN_d(reshape(Linear_{d→C}(mean over tokens of each "
        "head's d-channel slice)))) + a learned per-head position embedding, appended to the sequence; MHSA (one qkv) "
        "over N + heads tokens. The official block adds the mean of the head tokens' outputs to the CLS token: "
        "cls_token=True does that to token 0; the default (no CLS token in a grid) drops them."
    ),
    test_kwargs={"num_heads": 4},
    test_size=(12,),
)
class HeadTokenAttention(Mechanism):
    """Head-interacted MHSA (Lu et al., DHVT, 2022): MHSA over the tokens plus one summary token per head.

    The mean token's channels are split into the ``num_heads`` groups of the heads; each group is projected to a full
    ``dim``-token (per ``head_dim``-slice LayerNorm, GELU, learned position embedding), so every head's channels can
    interact with all heads in attention. Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major).

    Args:
        dim: channels in and out.
        num_heads: attention heads, also the number of head tokens (default ``dim // 32``).
        qkv_bias: bias of the qkv projection (official False).
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        cls_token: treat token 0 as a CLS token and add the head tokens' mean output to it (official).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cls_token: bool = False,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        if not isinstance(cls_token, bool):
            raise TypeError(f"cls_token={cls_token!r} must be a bool")
        self.cls_token = cls_token
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        self.head_proj = nn.Linear(self.head_dim, dim)
        self.head_norm = nn.LayerNorm(self.head_dim)
        self.head_pos = nn.Parameter(torch.zeros(self.num_heads, dim))
        nn.init.trunc_normal_(self.head_pos, std=0.02)

    def head_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, heads, C)`` summary tokens from ``tokens`` ``(B, N, C)``."""
        pooled = rearrange(tokens, "b n (h d) -> b h n d", h=self.num_heads).mean(dim=2)
        projected = rearrange(self.head_proj(pooled), "b h (g d) -> b h g d", g=self.num_heads)
        return nn.functional.gelu(self.head_norm(projected)).flatten(2) + self.head_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        n = tokens.shape[1]
        if n == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has no tokens to pool into head tokens")
        extended = torch.cat([tokens, self.head_tokens(tokens)], dim=1)
        q, k, v = split_qkv(self.qkv(extended), self.num_heads)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj(merge_heads(out))
        patches, heads = out[:, :n], out[:, n:]
        if self.cls_token:
            patches = torch.cat([patches[:, :1] + heads.mean(dim=1, keepdim=True), patches[:, 1:]], dim=1)
        return self.proj_drop(patches).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, cls_token={self.cls_token}"
