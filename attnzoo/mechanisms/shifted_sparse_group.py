"""SinkLoRA shifted sparse group attention: blocked attention, half the heads on half-shifted blocks, sink tokens."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import neighborhood_attention
from ._base import (
    Mechanism,
    check_int,
    flatten_tokens,
    merge_heads,
    reject_attn_drop,
    resolve_heads,
    split_qkv,
)
from ._windows import pad_to_multiple
from .registry import register_mechanism


@register_mechanism(
    "shifted_sparse_group",
    family="local",
    paper="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models",
    year=2024,
    layout="sequence",
    complexity="N·k",
    reference="official Dexter-GT-86/SinkLoRA (llama_attn_replace.py: the LongLoRA S²-Attn it starts from); "
    "longlora's shift-short attention",
    receptive_field="local",
    note="tokens in raster order are cut into groups of window_size (official: a quarter of the sequence); the first "
    "half of the heads attends inside the groups, the second half inside groups shifted by window_size // 2. As "
    "SinkLoRA's SF-Attn (unlike LongLoRA's roll in the stored code) the shifted groups do not wrap around; the "
    "first num_tokens tokens are attention sinks that every query also attends to (additional keys, counted once). "
    "Non-causal (the language-model code is causal)",
    test_kwargs={"window_size": 16, "num_heads": 2, "num_tokens": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class ShiftedSparseGroupAttention(Mechanism):
    """Shifted sparse group attention with sink tokens (Zhang, SinkLoRA 2024; S²-Attn of LongLoRA, Chen et al. 2024).

    The flattened tokens are split into groups of ``window_size``; heads ``[0, h/2)`` attend within the groups,
    heads ``[h/2, h)`` within groups offset by ``window_size // 2`` (information flows between neighbouring
    groups), and every query also attends to the first ``num_tokens`` tokens (global sinks), all in one softmax
    per head. Input ``(B, N, C)`` or a grid ``(B, *spatial, C)`` flattened row-major.

    Args:
        dim: channels. num_heads, head_dim: heads (even; default ``max(2, dim // 32)`` rounded to even) and width.
        window_size: group length (default: a quarter of the sequence, as in the official code). num_tokens: sink
        tokens (4). qkv_bias: bias of ``qkv``. attn_drop: must be 0. proj_drop: output dropout. backend: engine.
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        num_tokens: int = 4,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        if num_heads is None and head_dim is None:
            num_heads = max(2, dim // 32 + dim // 32 % 2)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        if self.num_heads % 2:
            raise ValueError(f"num_heads={self.num_heads} must be even (half the heads use shifted groups)")
        self.window_size = None if window_size is None else check_int("window_size", window_size, minimum=2)
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=0)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def group_size(self, n: int) -> int:
        return self.window_size if self.window_size is not None else max(2, -(-n // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        n, half = tokens.shape[1], self.num_heads // 2
        g, sinks = self.group_size(n), min(self.num_tokens, n)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        outs = []
        for heads, before in ((slice(0, half), 0), (slice(half, None), g // 2)):
            padding = pad_to_multiple((n,), (g,), before=(before,))
            key_bias = torch.zeros(padding.padded_shape, dtype=q.dtype, device=q.device)
            key_bias[before : before + sinks] = float("-inf")  # the sinks are seen once, as additional keys
            key_bias = key_bias.masked_fill(~padding.valid_mask(q.device), float("-inf"))[None, :, None]
            extra = {}
            if sinks:
                extra = dict(additional_keys=k[:, :sinks, heads], additional_values=v[:, :sinks, heads])
            gq, gk, gv = (padding.pad(t[:, :, heads]) for t in (q, k, v))
            out = neighborhood_attention(gq, gk, gv, g, g, key_bias=key_bias, backend=self.backend, **extra)
            outs.append(padding.crop(out))
        out = merge_heads(torch.cat(outs, dim=-2))
        return self.proj_drop(self.proj(out)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, num_tokens={self.num_tokens}"
        )
