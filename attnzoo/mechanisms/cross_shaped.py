"""CSWin cross-shaped window attention with locally-enhanced positional encoding (LePE)."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, merge_heads, renamed_kwargs, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism

_STRIPES = "b (nh sh) (nw sw) h d -> (b nh nw) (sh sw) h d"


@register_mechanism(
    "cross_shaped",
    family="local",
    receptive_field="local",
    paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
    year=2021,
    native_rank=2,
    complexity="N·k",
    reference="microsoft/CSWin-Transformer models/cswin.py::LePEAttention (CSWinBlock.qkv / attns[i].get_v / proj)",
    test_kwargs={"window_size": 2, "num_heads": 2},
    test_size=(6, 6),
    size_args={"window_size": "extent"},
)
class CrossShapedWindowAttention(Mechanism):
    """CSWin cross-shaped window attention (Dong et al., CSWin 2021) with LePE.

    One ``qkv`` projection; the first half of the heads attends inside vertical stripes (H × ``window_size``), the
    second half inside horizontal stripes (``window_size`` × W); each branch adds LePE, a depthwise 3×3 conv of V
    applied per stripe (zero padding at stripe edges). The halves are concatenated and projected.
    ``last_stage=True`` (CSWin's last stage) uses one branch with all heads and global attention + LePE.
    Extents that are not multiples of ``window_size`` are zero-padded at the end after the projection (LePE sees
    zeros) and the padded keys are masked.

    Stripes are a reshape (LePE needs the stripe layout anyway, and CSWin's stage-1 stripes of width 1 are
    below the neighborhood op's kernel minimum), with ``attnzoo.ops.attention`` inside each stripe.
    """

    @renamed_kwargs(split_size="window_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 7,
        last_stage: bool = False,
    ) -> None:
        super().__init__(dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        check_int("window_size", window_size)
        self.branches = 1 if last_stage else 2
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim, min_heads=self.branches)
        if self.num_heads % self.branches:
            raise ValueError(f"num_heads={self.num_heads} must be even (half the heads per stripe direction)")
        self.window_size, self.last_stage = window_size, bool(last_stage)
        inner = self.num_heads * self.head_dim
        width = inner // self.branches
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.lepe = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, groups=width) for _ in range(self.branches))
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int) -> torch.Tensor:
        """Stripe attention + LePE of one branch on ``(B, H, W, heads, d)`` q, k, v → ``(B, H, W, heads·d)``."""
        spatial = tuple(q.shape[1:3])
        if self.last_stage:
            stripe = spatial
        else:
            stripe = (spatial[0], self.window_size) if index == 0 else (self.window_size, spatial[1])
        padding = pad_to_multiple(spatial, stripe)
        grid = {"nh": padding.padded_shape[0] // stripe[0], "nw": padding.padded_shape[1] // stripe[1]}
        q, k, v = (rearrange(padding.pad(t), _STRIPES, **grid) for t in (q, k, v))
        mask = None
        if not padding.is_empty:
            valid = rearrange(padding.valid_mask(q.device), "(nh sh) (nw sw) -> (nh nw) 1 1 (sh sw)", **grid)
            mask = valid.repeat(q.shape[0] // valid.shape[0], 1, 1, 1)
        out = attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        lepe = self.lepe[index](rearrange(v, "n (sh sw) h d -> n (h d) sh sw", sh=stripe[0]))
        out = merge_heads(out) + rearrange(lepe, "n c sh sw -> n (sh sw) c")
        out = rearrange(out, "(b nh nw) (sh sw) c -> b (nh sh) (nw sw) c", **grid, sh=stripe[0])
        return padding.crop(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        heads = self.num_heads // self.branches  # first half of the heads: vertical stripes, second: horizontal
        branches = zip(*(t.split(heads, dim=-2) for t in (q, k, v)))
        out = torch.cat([self.branch(*qkv, index) for index, qkv in enumerate(branches)], dim=-1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, last_stage={self.last_stage}"
        )
