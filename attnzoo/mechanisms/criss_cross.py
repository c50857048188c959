"""CCNet recurrent criss-cross attention: one softmax over each pixel's row and column."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention, merge_attentions
from ._base import Mechanism, check_int
from .registry import register_mechanism


@register_mechanism(
    "criss_cross",
    family="local",
    paper="CCNet: Criss-Cross Attention for Semantic Segmentation",
    year=2019,
    native_rank=2,
    complexity="N·k",
    reference="mmcv.ops.CrissCrossAttention (returns x + ours at recurrence=1)",
    paper_identity=True,
    test_kwargs={"gamma_init": 0.5, "reduction": 4},
    test_size=(6, 7),
)
class CrissCrossAttention(Mechanism):
    """CCNet criss-cross attention (Huang et al., CCNet 2019), applied ``recurrence`` times with shared weights.

    Single head, unscaled logits ``Q_u·K_v`` over the H + W − 1 pixels in u's row and column (u itself once),
    one joint softmax, output γ·Σ A·V. The paper's module is f(x) = x + γ·CCA(x) and the block applies f
    ``recurrence`` times; this module returns ``f^R(x) − x`` (``paper_identity=True``). The joint softmax is the
    row attention merged through its log-sum-exp with the column attention whose diagonal (u itself) is masked.
    Weights are 1×1 convolutions named as in CCNet / mmcv (``query_conv``, ``key_conv``, ``value_conv``, ``gamma``).
    """

    def __init__(self, dim: int, *, reduction: int = 8, recurrence: int = 2, gamma_init: float = 0.0) -> None:
        super().__init__(dim)
        self.reduction = check_int("reduction", reduction)
        if reduction > dim:
            raise ValueError(f"reduction={reduction} must be <= dim={dim}")
        self.recurrence = check_int("recurrence", recurrence)
        self.query_conv = nn.Conv2d(dim, dim // reduction, 1)
        self.key_conv = nn.Conv2d(dim, dim // reduction, 1)
        self.value_conv = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def criss_cross(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of CCA (without γ) on NCHW ``x``."""
        height = x.shape[2]
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        rows = [rearrange(t, "b c h w -> (b h) w 1 c") for t in (q, k, v)]
        out_row, lse_row = attention(*rows, scale=1.0, return_lse=True)
        out_row = rearrange(out_row, "(b h) w 1 c -> b c h w", h=height)
        if height == 1:  # the column holds only u itself, already counted in the row
            return out_row
        lse_row = rearrange(lse_row, "(b h) w 1 -> b h w", h=height)
        cols = [rearrange(t, "b c h w -> (b w) h 1 c") for t in (q, k, v)]
        off_diagonal = ~torch.eye(height, dtype=torch.bool, device=x.device)
        out_col, lse_col = attention(*cols, scale=1.0, attn_mask=off_diagonal, return_lse=True)
        out_col = rearrange(out_col, "(b w) h 1 c -> b c h w", b=x.shape[0])
        lse_col = rearrange(lse_col, "(b w) h 1 -> b h w", b=x.shape[0])
        out, _ = merge_attentions([out_row.movedim(1, -1), out_col.movedim(1, -1)], [lse_row, lse_col])
        return out.movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        start = x.permute(0, 3, 1, 2)
        y = start
        for _ in range(self.recurrence):
            y = y + self.gamma.to(y.dtype) * self.criss_cross(y)
        return (y - start).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, recurrence={self.recurrence}"
