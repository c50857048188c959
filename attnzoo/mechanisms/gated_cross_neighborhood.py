"""RTM / ASCFormer gated neighborhood cross-attention: queries from one stream, keys and values from another."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, merge_heads, reject_attn_drop, resolve_heads
from .registry import register_mechanism


@register_mechanism(
    "gated_cross_neighborhood",
    family="local",
    paper="Towards Robust Tampered Text Detection in Document Image: New Dataset and New Solution (RTM, ASCFormer)",
    year=2023,
    complexity="N·k",
    reference="official DrLuo/RTM (ASCFormer/mmseg/models/toys/fusers.py: NATFusionModule attn_mode='cross', "
    "NATFusionLayer gated=True)",
    receptive_field="local",
    note="implements the official fusion: q = embed_q(x), k/v = embed_k/embed_v(context), 2-D neighborhood "
    "attention with NAT's relative position bias, proj; the gate is the official scalar tanh gate mixing the input "
    "and the attention, (1 - tanh γ)·x + tanh γ·attn (not a sigmoid). The official γ starts at 0 (output = input); "
    "here gate_init sets tanh γ (0.5 by default, so every branch is live). Without context the module fuses x with "
    "itself; the official pre-norms and MLP belong to the surrounding block",
    test_kwargs={"kernel_size": 3, "num_heads": 2},
    test_size=(8, 8),
    size_args={"kernel_size": "span"},
)
class GatedCrossNeighborhoodAttention(Mechanism):
    """Gated neighborhood cross-attention (Luo et al., RTM / ASCFormer, CVPR 2023).

    ``y = (1 − tanh γ)·x + tanh γ · proj(NA(q = W_q x, k = W_k c, v = W_v c))`` where ``c`` is the auxiliary
    stream (``context``, same shape as ``x``; ``x`` itself when omitted), NA is neighborhood attention with a
    relative position bias, and γ a learned scalar. Call as ``module(x, context)``.

    Args:
        dim: channels. num_heads, head_dim: heads (default ``dim // 32``) and per-head width. kernel_size,
        dilation: the neighborhood (7, 1). qkv_bias: biases of the embeddings. rel_pos_bias: NAT's bias table.
        gate_init: initial value of tanh γ in [0, 1). attn_drop: must be 0. proj_drop: output dropout.
        backend: engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        kernel_size: int | Sequence[int] = 7,
        dilation: int | Sequence[int] = 1,
        qkv_bias: bool = True,
        rel_pos_bias: bool = True,
        gate_init: float = 0.5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not 0.0 <= gate_init < 1.0:
            raise ValueError(f"gate_init={gate_init!r} must be a float in [0, 1) (the initial tanh of the gate)")
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.kernel_size = normalize_axis_arg("kernel_size", kernel_size, 2, minimum=2)
        self.dilation = normalize_axis_arg("dilation", dilation, 2, minimum=1)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.embed_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.embed_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.embed_v = nn.Linear(dim, inner, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(self.num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gate = nn.Parameter(torch.tensor(math.atanh(gate_init)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        if context is None:
            context = x
        elif not isinstance(context, torch.Tensor) or context.shape != x.shape or context.dtype != x.dtype:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context.shape={got} must equal x.shape={tuple(x.shape)} (and share its dtype)")
        split = lambda t: rearrange(t, "b y x (h d) -> b y x h d", h=self.num_heads)  # noqa: E731
        q, k, v = split(self.embed_q(x)), split(self.embed_k(context)), split(self.embed_v(context))
        rpb = None if self.rpb is None else self.rpb.to(q.dtype)
        attn = neighborhood_attention(
            q, k, v, self.kernel_size, dilation=self.dilation, rel_pos_bias=rpb, backend=self.backend
        )
        attn = self.proj_drop(self.proj(merge_heads(attn)))
        gate = torch.tanh(self.gate).to(x.dtype)
        return (1 - gate) * x + gate * attn

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"
