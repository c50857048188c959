"""RGT recursive-generalization self-attention: every query attends to a recursively pooled summary map."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, resolve_heads
from .registry import register_mechanism

__all__ = ["RecursiveGeneralizationAttention", "num_recursions"]


def num_recursions(rows: int, cols: int) -> int:
    """Stride-4 reductions applied to a ``rows × cols`` map: ``⌊log₄(min(rows, cols) / 4)⌋`` (at least 0), so the
    summary keeps at least 4 tokens per side on the shorter axis."""
    count, side = 0, min(rows, cols)
    while side >= 16:
        side //= 4
        count += 1
    return count


@register_mechanism(
    "recursive_generalization",
    family="summary-token",
    paper="Recursive Generalization Transformer for Image Super-Resolution (RGT)",
    year=2024,
    complexity="linear",
    reference="zhengchen1999/RGT basicsr/archs/rgt_arch.py::RG_SA (read from a copy of the official file)",
    receptive_field="global",
    note=(
        "As the official RG_SA: the map is reduced T times by one shared depthwise 4×4 stride-4 convolution, then a "
        "depthwise 3×3 and a 1×1 conv to qk channels, LayerNorm, GELU; q = Linear(x) and k = Linear(summary) of "
        "qk_dim per head (c_ratio 0.5), v = Linear(summary) of head_dim, plus a depthwise 3×3 conv of v on the "
        "summary grid (CPE); cross-attention of all tokens over the summary. T: the official code uses "
        "max over axes of ⌊log₄(side/4)⌋ in training and of ⌊log₄(side/16)⌋ (at least 2) in eval; here one rule for "
        "both modes, ⌊log₄(min side/4)⌋ (≥ 0), which equals the training rule on square maps and never reduces an "
        "axis below 4 tokens. With T = 0 the keys are the full map at qk channels."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(16, 16),
)
class RecursiveGeneralizationAttention(Mechanism):
    """Recursive-generalization self-attention (Chen et al., RGT, 2024): cross-attention to a recursively pooled map.

    Input ``(B, H, W, C)``; keys and values come from the ``(H/4^T) × (W/4^T)`` summary (``num_recursions``).

    Args:
        dim: channels in and out.
        num_heads: attention heads (default ``dim // 32``).
        head_dim: per-head value width (default ``dim // num_heads``).
        qk_dim: per-head query/key width (default ``head_dim // 2``, the official c_ratio 0.5).
        qkv_bias: bias of the q, k, v projections (official RGT models: True).
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qk_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.qk_dim = check_int("qk_dim", qk_dim if qk_dim is not None else max(1, self.head_dim // 2))
        self.attn_drop = check_probability("attn_drop", attn_drop)
        h, reduced = self.num_heads, self.num_heads * self.qk_dim
        inner = h * self.head_dim
        self.reduce = nn.Conv2d(dim, dim, kernel_size=4, stride=4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.conv = nn.Conv2d(dim, reduced, kernel_size=1)
        self.norm = nn.LayerNorm(reduced)
        self.q = nn.Linear(dim, reduced, bias=qkv_bias)
        self.k = nn.Linear(reduced, reduced, bias=qkv_bias)
        self.v = nn.Linear(reduced, inner, bias=qkv_bias)
        self.cpe = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        """The generalized map ``(B, h', w', heads·qk_dim)`` of ``x`` ``(B, H, W, C)``."""
        y = x.permute(0, 3, 1, 2)
        for _ in range(num_recursions(x.shape[1], x.shape[2])):
            y = self.reduce(y)
        y = self.conv(self.dwconv(y)).permute(0, 2, 3, 1)
        return nn.functional.gelu(self.norm(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        if rows == 0 or cols == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has an empty spatial axis; this mechanism pools a grid")
        summary = self.summary(x)
        v = self.v(summary)
        v = v + self.cpe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        q = rearrange(self.q(x), "b y x (h d) -> b (y x) h d", h=self.num_heads)
        k = rearrange(self.k(summary), "b y x (h d) -> b (y x) h d", h=self.num_heads)
        v = rearrange(v, "b y x (h d) -> b (y x) h d", h=self.num_heads)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = rearrange(out, "b (y x) h d -> b y x (h d)", y=rows)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, qk_dim={self.qk_dim}"
