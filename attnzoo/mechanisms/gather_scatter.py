"""Isomer semantic gathering-scattering: tokens query a few soft-merged foreground or background semantic tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, flatten_tokens, merge_heads, resolve_heads
from .registry import register_mechanism

__all__ = ["GatherScatterAttention"]


@register_mechanism(
    "gather_scatter",
    family="summary-token",
    paper="Isomer: Isomerous Transformer for Zero-shot Video Object Segmentation (SGST)",
    year=2023,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="DLUT-yyc/Isomer lib/module/sgst.py::SemanticGatheringScatteringTransformer (official; read)",
    receptive_field="global",
    note=(
        "As the official SGST attention: saliency s = sigmoid(Linear(x)); foreground tokens s ≥ threshold, background "
        "s < 1 − threshold; num_tokens foreground semantic tokens = W_fg(x·s)ᵀ(x·s) and background ones from x·(1−s) "
        "(linear soft weights, no softmax, as official; here divided by N so their scale does not grow with the "
        "resolution); foreground tokens cross-attend to the foreground semantic tokens, background tokens to the "
        "background ones (separate attention weights), and the results are scattered back to their positions "
        "(tokens in neither set, possible when threshold > 0.5, get 0). The official scatter writes into a discarded "
        "clone (a no-op); here it takes effect. Both branches are computed for every token and selected per token, "
        "which equals gathering the selected tokens and keeps shapes static; the official fallback for an all-"
        "foreground or all-background image is not needed. The thresholded partition passes no gradient; the "
        "saliency learns through the soft weights. Isomer's context-sharing transformer (CST) is GCNet's global "
        "context block, registered as `global_context`, so it is not repeated here."
    ),
    test_kwargs={"num_heads": 2, "num_tokens": 4},
    test_size=(12,),
)
class GatherScatterAttention(Mechanism):
    """Semantic gathering-scattering attention (Yuan et al., Isomer, 2023): fg/bg tokens attend to soft-merged tokens.

    Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major); cost O(N·num_tokens).

    Args:
        dim: channels in and out.
        num_heads: attention heads of each branch (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of the q/k/v projections.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projections.
        num_tokens: semantic tokens per branch (official select_tokens).
        threshold: saliency threshold splitting foreground and background (0.5: every token is in one set).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_tokens: int = 16,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.num_tokens = check_int("num_tokens", num_tokens)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.5 <= threshold <= 1:
            raise ValueError(f"threshold={threshold!r} must be in [0.5, 1] (foreground and background may not overlap)")
        self.threshold = float(threshold)
        inner = self.num_heads * self.head_dim
        self.saliency = nn.Linear(dim, 1)
        self.gather = nn.ModuleDict({side: nn.Linear(dim, num_tokens) for side in ("fg", "bg")})
        self.q = nn.ModuleDict({side: nn.Linear(dim, inner, bias=qkv_bias) for side in ("fg", "bg")})
        self.kv = nn.ModuleDict({side: nn.Linear(dim, 2 * inner, bias=qkv_bias) for side in ("fg", "bg")})
        self.proj = nn.ModuleDict({side: nn.Linear(inner, dim) for side in ("fg", "bg")})
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def branch(self, side: str, tokens: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
        """Every token's output ``(B, N, C)`` if it belonged to ``side``, with semantic tokens from ``weighted``."""
        semantic = torch.einsum("bnk,bnc->bkc", self.gather[side](weighted), weighted) / weighted.shape[1]
        k, v = rearrange(self.kv[side](semantic), "b k (two h d) -> two b k h d", two=2, h=self.num_heads)
        q = rearrange(self.q[side](tokens), "b n (h d) -> b n h d", h=self.num_heads)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj[side](merge_heads(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        if tokens.shape[1] == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has no tokens to gather into semantic tokens")
        heat = torch.sigmoid(self.saliency(tokens))  # [B, N, 1]
        foreground = self.branch("fg", tokens, tokens * heat)
        background = self.branch("bg", tokens, tokens * (1 - heat))
        zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        out = torch.where(heat >= self.threshold, foreground, torch.where(heat < 1 - self.threshold, background, zero))
        return self.proj_drop(out).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_tokens={self.num_tokens}, threshold={self.threshold}"
