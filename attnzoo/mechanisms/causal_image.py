"""iLLaMA's causal self-attention over image tokens in raster order, with 1-D RoPE and the soft-mask schedule."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn

from ..ops import attention
from ._base import (
    Mechanism,
    cached_table,
    check_divisible,
    check_probability,
    flatten_tokens,
    merge_heads,
    resolve_heads,
    split_qkv,
)
from ._rotary import rotate_pairs
from .registry import register_mechanism

__all__ = ["CausalImageAttention"]


@lru_cache(maxsize=32)
def _token_angles(tokens: int, head_dim: int) -> torch.Tensor:
    """LLaMA's RoPE angles ``t·10000^(−2p/d)`` for tokens ``t = 0..N−1``; ``[N, d/2]`` in float64."""
    theta = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.arange(tokens, dtype=torch.float64)[:, None] * theta


@register_mechanism(
    "causal_image",
    family="global",
    paper="Adapting LLaMA Decoder to Vision Transformer",
    year=2024,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="techmonsterwang/iLLaMA models/illama.py Attention, mask_scheduler.py",
    receptive_field="causal",
    note=(
        "Raster-order causal MHSA on the engine's is_causal with iLLaMA's 1-D RoPE (LLaMA angles over the token "
        "index). Soft mask: iLLaMA trains with mask = r·1 + (1−r)·causal, r going linearly from its start value to 0 "
        "over the first epochs (mask_scheduler.py; set soft_mask_rate from the training loop). The official code "
        "multiplies the full softmax by that mask without renormalising; here the soft phase mixes the two "
        "normalised attentions, r·softmax(all) + (1−r)·softmax(causal), so r = 0 is exactly the causal attention "
        "used at inference. The class token goes last in the sequence (a model choice, outside the mixer)."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(12,),
)
class CausalImageAttention(Mechanism):
    """Causal image attention (Wang et al., "Adapting LLaMA Decoder to Vision Transformer" / iLLaMA, 2024).

    Token ``i`` (row-major order) attends to tokens ``0..i`` with RoPE on q and k. During training with
    ``soft_mask_rate = r > 0`` the attention is ``r·softmax(all) + (1−r)·softmax(causal)`` (the soft mask that
    eases the optimisation early in training); in eval mode or with ``r = 0`` it is plain causal attention.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 64``, iLLaMA's head width).
        head_dim: per-head width (even, for RoPE).
        qkv_bias: bias of the qkv projection.
        rope: apply the 1-D rotary embedding to q and k.
        soft_mask_rate: the soft-mask rate r in [0, 1) (a schedule value; change it with ``set_soft_mask_rate``).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout on the output.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        rope: bool = True,
        soft_mask_rate: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, default_head_dim=64)
        if rope:
            check_divisible("head_dim", self.head_dim, "2 (rotary pairs)", 2)
        self.rope = bool(rope)
        self.set_soft_mask_rate(soft_mask_rate)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def set_soft_mask_rate(self, rate: float) -> None:
        """Set the soft-mask rate r (iLLaMA's ``update_soft_mask``): 0 = causal, towards 1 = bidirectional."""
        self.soft_mask_rate = check_probability("soft_mask_rate", rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        if self.rope:
            angles = cached_table(_token_angles, tokens.shape[1], self.head_dim).to(x.device)[:, None]
            q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        dropout = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, is_causal=True, dropout_p=dropout)
        if self.training and self.soft_mask_rate > 0:
            rate = self.soft_mask_rate
            out = rate * attention(q, k, v, dropout_p=dropout) + (1 - rate) * out
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, rope={self.rope}, soft_mask_rate={self.soft_mask_rate}"
