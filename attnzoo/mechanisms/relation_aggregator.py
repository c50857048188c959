"""UniFormer's multi-head relation aggregator: learned local affinity (shallow stages) or global MHSA (deep)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_choice, check_int, check_probability, merge_heads, resolve_heads, split_qkv
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


@register_mechanism(
    "relation_aggregator",
    family="conv",
    paper="UniFormer: Unifying Convolution and Self-attention for Visual Recognition",
    year=2022,
    complexity="N·k",
    receptive_field="local",
    reference="official Sense-X/UniFormer image_classification/models/uniformer.py::CBlock (conv1 → attn 5×5 "
    "depthwise → conv2) and SABlock/Attention (read)",
    note="The dynamic position embedding x + DWConv3×3(x) that UniFormer blocks apply before the MHRA is not "
    "included (it is a block part, not the aggregator); UniFormer's local blocks pre-normalise with BatchNorm, "
    "attnzoo's block with LayerNorm.",
    size_args={"kernel_size": "kernel"},
)
class RelationAggregator(Mechanism):
    """Multi-head relation aggregator (Li et al., UniFormer, ICLR 2022 / TPAMI 2023).

    ``kind="local"`` (stages 1–2): the affinity between tokens is a learned function of their offset inside a
    ``kernel_size``² neighbourhood, one per channel: Conv1×1 (value projection) → depthwise Conv_{K} → Conv1×1.
    ``kind="global"`` (stages 3–4): the affinity is content similarity over all tokens, i.e. MHSA
    softmax(qkᵀ/√d)v with heads of ``head_dim`` channels.

    Args:
        dim: channels.
        kind: ``"local"`` or ``"global"``.
        kernel_size: side of the local affinity (5).
        num_heads: heads of the global form (default ``dim // 64``, at least 1: UniFormer's head width is 64).
        head_dim: per-head width of the global form (alternative to ``num_heads``).
        qkv_bias: biases of the global q/k/v projection (True).
        attn_drop: dropout on the global attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "local",
        kernel_size: int = 5,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.kind = check_choice("kind", kind, ("local", "global"))
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        if kind == "local":
            self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
            self.conv1 = nn.Conv2d(dim, dim, 1)
            self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
            self.conv2 = nn.Conv2d(dim, dim, 1)
            return
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, default_head_dim=64)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.kind == "local":
            return self.proj_drop(to_nhwc(self.conv2(self.attn(self.conv1(to_nchw(x))))))
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        detail = f"kernel_size={self.kernel_size}" if self.kind == "local" else f"num_heads={self.num_heads}"
        return f"dim={self.dim}, kind={self.kind!r}, {detail}"
