"""GC ViT global context attention: window attention whose queries are global tokens pooled from the whole map."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, check_int, merge_heads, reject_attn_drop, resolve_heads
from ._channel_conv import to_nchw, to_nhwc
from ._windows import flip_table, pad_to_multiple
from .registry import register_mechanism


class FusedMBConv(nn.Module):
    """GC ViT's fused MBConv: depthwise 3×3, GELU, squeeze-excite (ratio 1/4, GELU), pointwise, residual (NCHW)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(8, int(dim / 4 + 4) // 8 * 8)  # timm's make_divisible(dim / 4, 8, round_limit=0)
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = nn.ModuleDict(
            {"fc1": nn.Conv2d(dim, hidden, 1, bias=False), "fc2": nn.Conv2d(hidden, dim, 1, bias=False)}
        )
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv_dw(x))
        gate = torch.sigmoid(self.se["fc2"](self.act(self.se["fc1"](y.mean((2, 3), keepdim=True)))))
        return x + self.conv_pw(y * gate)


@register_mechanism(
    "global_context_vit",
    family="local",
    paper="Global Context Vision Transformers",
    year=2023,
    complexity="N·k",
    reference="timm.models.gcvit: FeatureBlock (global query generator) + WindowAttentionGlobal",
    receptive_field="global",
    note="the global query map is max-pooled adaptively to the window when levels of stride-2 pooling do not land on it "
    "exactly (timm requires input = window · 2^levels)",
    test_kwargs={"window_size": 4, "levels": 1, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class GlobalContextAttention(Mechanism):
    """Global context self-attention (Hatamizadeh et al., GC ViT, ICML 2023).

    A global query generator (``levels`` × [fused MBConv, 3×3/2 max-pool]) shrinks the whole map to one
    ``window_size`` grid of tokens; split into heads, they are the queries of every window, and the keys and
    values come from the window's own tokens (plus a Swin relative position bias). So every output depends on the
    whole image through the query. Extents are zero-padded at the end to whole windows (padded keys masked).
    Parameter names follow timm (``global_block.blocks.conv1…``, ``qkv`` for k and v, ``proj``).

    Args:
        dim: channels. num_heads: heads (``head_dim = dim // num_heads``; the global tokens carry no projection).
        window_size: window extent (7). levels: stride-2 pooling levels of the query generator (log2(map / window);
        2 at the paper's 28×28 stage). qkv_bias: bias of ``qkv``. attn_drop: must be 0. proj_drop: output dropout.
        backend: engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        window_size: int | Sequence[int] = 7,
        levels: int = 2,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.window_size = normalize_axis_arg("window_size", window_size, 2, minimum=2)
        self.levels = check_int("levels", levels, minimum=0)
        self.backend = backend
        self.global_block = nn.Module()
        self.global_block.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.global_block.blocks.add_module(f"conv{i + 1}", FusedMBConv(dim))
            if i < levels:
                self.global_block.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(3, 2, 1))
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        entries = math.prod(2 * m - 1 for m in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def global_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *window_size, heads, head_dim)`` global query tokens of an input ``(B, H, W, C)``."""
        pooled = self.global_block.blocks(to_nchw(x))
        if tuple(pooled.shape[-2:]) != self.window_size:
            pooled = F.adaptive_max_pool2d(pooled, self.window_size)
        return rearrange(to_nhwc(pooled), "b h w (heads d) -> b h w heads d", heads=self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        window = self.window_size
        padding = pad_to_multiple(spatial, window)
        grid = tuple(p // m for p, m in zip(padding.padded_shape, window))
        q = self.global_queries(x).repeat(1, *grid, 1, 1)  # the same queries in every window
        k, v = rearrange(
            self.qkv(padding.pad(x)), "b h w (two heads d) -> two b h w heads d", two=2, heads=self.num_heads
        )
        table = flip_table(
            self.relative_position_bias_table.t().reshape(self.num_heads, *(2 * m - 1 for m in window)), 2
        )
        out = neighborhood_attention(
            q,
            k,
            v,
            window,
            window,
            rel_pos_bias=table.to(q.dtype),
            key_bias=padding.key_bias(q.dtype, q.device),
            backend=self.backend,
        )
        return self.proj_drop(self.proj(merge_heads(padding.crop(out))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, levels={self.levels}"
