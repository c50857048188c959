"""LITv2 HiLo attention: window attention on some heads (high frequencies), pooled global attention on the rest."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention, neighborhood_attention
from ._base import Mechanism, check_int, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism


def _min_heads(alpha: float) -> int:
    """The fewest heads (at least 2) for which ⌊alpha·h⌋ Lo-Fi heads and the rest Hi-Fi heads are both non-empty."""
    heads = 2
    while int(heads * alpha) < 1:
        heads += 1
    return heads


@register_mechanism(
    "hilo",
    family="local",
    paper="Fast Vision Transformers with HiLo Attention (LITv2)",
    year=2022,
    complexity="quadratic",
    reference="ziplab/LITv2 classification/models/attentions.py::HiLo (official; no pip package)",
    test_kwargs={"num_heads": 4, "window_size": 2, "alpha": 0.5},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class HiLoAttention(Mechanism):
    """HiLo attention from LITv2 (Pan et al., 2022).

    The heads split into ⌊alpha·h⌋ Lo-Fi heads and the rest Hi-Fi heads (head_dim = C/h). By default
    h = max(C/32, the fewest heads that give each branch one head), so every width keeps both branches (LITv2's
    own configurations always have Lo-Fi heads); an explicit ``num_heads`` that leaves a branch empty is refused. Hi-Fi: MHSA inside
    non-overlapping ``window_size``² windows, then ``h_proj``. Lo-Fi: queries from every token attend to keys and
    values from the ``window_size``-average-pooled map, then ``l_proj``. The output concatenates [Hi-Fi, Lo-Fi]
    channels (no joint projection). ``window_size=1``: all heads are Lo-Fi without pooling (plain MHSA).
    Sizes that are not a multiple of ``window_size``: Hi-Fi pads bottom/right and masks the padded keys, Lo-Fi
    averages the real tokens of each edge window (``mask_padding=True``); ``mask_padding=False`` zero-pads the
    input as LITv2's detection code does.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 2,
        alpha: float = 0.9,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        check_int("window_size", window_size)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha!r} must be a float in [0, 1]")
        both = window_size > 1 and 0 < alpha < 1  # both branches asked for: at least one head each
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None, min_heads=_min_heads(alpha) if both else 1)
        self.window_size = window_size
        self.alpha = alpha
        self.mask_padding = mask_padding
        self.l_heads = self.num_heads if window_size == 1 else int(self.num_heads * alpha)
        self.h_heads = self.num_heads - self.l_heads
        if both and not (self.l_heads and self.h_heads):
            raise ValueError(
                f"num_heads={self.num_heads} with alpha={alpha} gives {self.l_heads} Lo-Fi and {self.h_heads} Hi-Fi "
                f"heads: 0 < alpha < 1 needs num_heads >= {_min_heads(alpha)} so that both branches have a head"
            )
        l_dim, h_dim = self.l_heads * self.head_dim, self.h_heads * self.head_dim
        if self.l_heads:
            self.l_q = nn.Linear(dim, l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(l_dim, l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(h_dim, h_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        padding = pad_to_multiple(tuple(x.shape[1:-1]), (self.window_size,) * 2)
        q, k, v = split_qkv(self.h_qkv(padding.pad(x)), self.h_heads)
        key_bias = padding.key_bias(q.dtype, q.device) if self.mask_padding else None
        out = neighborhood_attention(q, k, v, kernel_size=self.window_size, stride=self.window_size, key_bias=key_bias)
        return self.h_proj(padding.crop(merge_heads(out)))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.l_q(x), "b y x (h d) -> b y x h d", h=self.l_heads)
        pooled = x
        if self.window_size > 1:
            ws = self.window_size
            if self.mask_padding:  # ceil_mode windows past the border average only their real tokens
                pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), ws, ws, ceil_mode=True)
            else:
                padded = pad_to_multiple(tuple(x.shape[1:-1]), (ws, ws)).pad(x)
                pooled = F.avg_pool2d(padded.permute(0, 3, 1, 2), ws, ws)
            pooled = pooled.permute(0, 2, 3, 1)
        k, v = rearrange(self.l_kv(pooled), "b y x (two h d) -> two b y x h d", two=2, h=self.l_heads)
        return self.l_proj(merge_heads(attention(q, k, v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        parts = []
        if self.h_heads:
            parts.append(self.hifi(x))
        if self.l_heads:
            parts.append(self.lofi(x))
        return self.proj_drop(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads} (hi {self.h_heads}, lo {self.l_heads}), "
            f"window_size={self.window_size}, mask_padding={self.mask_padding}"
        )
