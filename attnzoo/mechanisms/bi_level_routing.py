"""BiFormer bi-level routing attention (BRA): route each region to its top-k regions, then attend token-to-token."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_divisible, check_int, renamed_kwargs, resolve_heads
from ._windows import pad_to_multiple
from .registry import register_mechanism

__all__ = ["BiLevelRoutingAttention"]


@register_mechanism(
    "bi_level_routing",
    family="content-routed",
    receptive_field="local",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    year=2023,
    native_rank=2,
    complexity="N·k",
    reference="rayleizhu/BiFormer ops/bra_legacy.py::BiLevelRoutingAttention (official; keys qkv.qkv, wo, lepe)",
    test_kwargs={"num_heads": 2, "num_windows": 2, "topk": 2, "kernel_size": 3},
    test_size=(6, 8),
    size_args={"num_windows": "count", "kernel_size": "kernel"},
)
class BiLevelRoutingAttention(Mechanism):
    """Bi-level routing attention (Zhu et al., BiFormer 2023): region-level top-k routing, then token attention.

    The map is cut into ``num_windows × num_windows`` regions. Region means of Q and K give a region affinity
    ``σ·Q^r(K^r)ᵀ`` from which each region keeps its ``topk`` regions (the routing is not differentiated); every
    query then attends to all tokens of its routed regions with ``SM(σ·q·kᵀ)``, **σ = qk_dim^-1/2** (not
    head_dim^-1/2, as in the paper's code). A depthwise ``kernel_size`` convolution of V (LCE) is added, then a
    Linear. Sizes not divisible by ``num_windows`` are zero-padded at bottom/right; ``mask_padding`` (default) keeps
    padded tokens out of region means and keys. Input ``(B, H, W, C)``.
    """

    spatial_ranks = (2,)

    @renamed_kwargs(n_win="num_windows", side_dwconv="kernel_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        num_windows: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        kernel_size: int = 5,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_int("num_windows", num_windows)
        if not isinstance(topk, int) or not 1 <= topk <= num_windows * num_windows:
            raise ValueError(f"topk={topk!r} must be an int in [1, num_windows²={num_windows * num_windows}]")
        qk_dim = dim if qk_dim is None else qk_dim
        check_divisible("qk_dim", check_int("qk_dim", qk_dim), "num_heads", self.num_heads)
        if not isinstance(kernel_size, int) or kernel_size < 0 or (kernel_size and kernel_size % 2 == 0):
            raise ValueError(f"kernel_size={kernel_size!r} must be 0 (no LCE) or an odd kernel size")
        self.num_windows, self.topk, self.qk_dim, self.mask_padding = num_windows, topk, qk_dim, mask_padding
        self.scale = qk_dim**-0.5
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + inner, bias=qkv_bias)
        self.lepe = (
            nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner) if kernel_size else None
        )
        self.wo = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def route(self, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, R, topk]`` of the regions each region attends to; q, k ``[B, R, T, C_qk]``, valid ``[R, T]``."""
        weight = valid.to(q.dtype)[None, :, :, None]
        count = weight.sum(2).clamp_min(1.0)
        q_region, k_region = (q * weight).sum(2) / count, (k * weight).sum(2) / count
        affinity = (q_region * self.scale) @ k_region.transpose(-1, -2)  # [B, R, R]
        affinity = affinity.masked_fill(~valid.any(-1), float("-inf"))  # regions made only of padding
        return torch.topk(affinity.detach(), self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        s, h = self.num_windows, self.num_heads
        padding = pad_to_multiple((rows, cols), (s, s))
        q, k, v = self.qkv(padding.pad(x)).split([self.qk_dim, self.qk_dim, self.num_heads * self.head_dim], dim=-1)
        regions = "b (sy ry) (sx rx) c -> b (sy sx) (ry rx) c"
        q, k, v_reg = (rearrange(t, regions, sy=s, sx=s) for t in (q, k, v))
        if self.mask_padding:
            valid = rearrange(padding.valid_mask(x.device), "(sy ry) (sx rx) -> (sy sx) (ry rx)", sy=s, sx=s)
        else:
            valid = torch.ones(q.shape[1], q.shape[2], dtype=torch.bool, device=x.device)
        routes = self.route(q, k, valid)  # [B, R, topk]
        batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
        keys, values = (rearrange(t[batch, routes], "b r k t c -> (b r) (k t) c") for t in (k, v_reg))
        mask = None
        if self.mask_padding and not padding.is_empty:
            mask = rearrange(valid[routes], "b r k t -> (b r) 1 1 (k t)")
        out = attention(
            rearrange(q, "b r t c -> (b r) t c").unflatten(-1, (h, -1)),
            keys.unflatten(-1, (h, -1)),
            values.unflatten(-1, (h, -1)),
            scale=self.scale,
            attn_mask=mask,
        )
        out = rearrange(
            out, "(b sy sx) (ry rx) h d -> b (sy ry) (sx rx) (h d)", sy=s, sx=s, ry=padding.padded_shape[0] // s
        )
        out = padding.crop(out)
        if self.lepe is not None:
            out = out + self.lepe(padding.crop(v).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.wo(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_windows={self.num_windows}, topk={self.topk}, "
            f"qk_dim={self.qk_dim}, mask_padding={self.mask_padding}"
        )
