"""DaViT channel group attention: attention among the channels of a group, with tokens as the feature axis."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_probability, flatten_tokens, resolve_heads
from .registry import register_mechanism

__all__ = ["ChannelGroupAttention"]


@register_mechanism(
    "channel_group",
    family="channel",
    paper="DaViT: Dual Attention Vision Transformers",
    year=2022,
    native_rank=2,
    complexity="linear",
    reference="timm.models.davit.ChannelAttention (our Q̂, K̂, V̂ = timm's k, v, q slices of qkv)",
    test_kwargs={"num_heads": 4},
)
class ChannelGroupAttention(Mechanism):
    """Channel group attention (Ding et al., DaViT, 2022): transposed attention, channels as tokens.

    ``[Q̂, K̂, V̂] = qkv(x)`` split into ``num_heads`` groups of ``C_g = C/G`` channels; per group the ``C_g × C_g``
    map ``A = softmax_row(C_g^-1/2 · Q̂ᵀK̂)`` (sums over all N tokens) mixes channels: ``out = (A V̂ᵀ)ᵀ``; groups
    concatenated and projected. Global receptive field at cost linear in N. Works on any number of spatial axes.
    Weight transfer from timm/official DaViT: their q, k, v slices are our V̂, Q̂, K̂.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.group_dim = resolve_heads(dim, num_heads, None)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        # channels become the attention's tokens and the N spatial tokens its feature axis: [B, C_g, G, N]
        q, k, v = rearrange(self.qkv(tokens), "b n (three g c) -> three b c g n", three=3, g=self.num_heads)
        out = attention(q, k, v, scale=self.group_dim**-0.5, dropout_p=self.attn_drop if self.training else 0.0)
        out = rearrange(out, "b c g n -> b n (g c)")
        return self.proj_drop(self.proj(out)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, group_dim={self.group_dim}"
