"""RMT Manhattan self-attention (MaSA): softmax attention with a per-head decay γ^(Manhattan distance) and 2-D RoPE."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, cached_table, check_int, check_probability, renamed_kwargs, resolve_heads
from .registry import register_mechanism

__all__ = ["ManhattanSelfAttention", "rotary_tables", "distance_table", "log_decay"]


@lru_cache(maxsize=32)
def rotary_tables(num_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)`` ``[N, head_dim]`` float64 for rotary position ``n`` (RMT's flattened index), one frequency
    ``10000^(−m/(d/2−1))`` per interleaved channel pair."""
    angle = 10000.0 ** -torch.linspace(0, 1, head_dim // 2, dtype=torch.float64)
    phase = torch.arange(num_tokens, dtype=torch.float64)[:, None] * angle.repeat_interleave(2)[None, :]
    return phase.sin(), phase.cos()


@lru_cache(maxsize=64)
def distance_table(*extent: int) -> torch.Tensor:
    """``[N, N]`` float64 Manhattan distance between the row-major tokens of a grid of shape ``extent``."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(e) for e in extent), indexing="ij")).flatten(1)
    return (coords[:, :, None] - coords[:, None, :]).abs().sum(0).double()


@lru_cache(maxsize=64)
def log_decay(num_heads: int, init_value: float, heads_range: float) -> torch.Tensor:
    """``[heads]`` float64 ``ln γ_h = ln(1 − 2^(−a − b·h/H))``."""
    exponent = -init_value - heads_range * torch.arange(num_heads, dtype=torch.float64) / num_heads
    return torch.log1p(-(2.0**exponent))


def rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: ``x·cos + rot(x)·sin`` with ``rot(x)_{2m} = −x_{2m+1}, rot(x)_{2m+1} = x_{2m}``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    return x * cos + rotated * sin


@register_mechanism(
    "manhattan",
    family="global",
    paper="RMT: Retentive Networks Meet Vision Transformers",
    year=2023,
    native_rank=2,
    complexity="quadratic",
    reference="official qhfan/RMT classfication_release/RMT.py::VisionRetentionAll / VisionRetentionChunk "
    "+ RetNetRelPos2d",
    test_kwargs={"num_heads": 4},
    test_size=(5, 6),
    size_args={"kernel_size": "kernel"},
)
class ManhattanSelfAttention(Mechanism):
    """Manhattan self-attention (Fan et al., RMT, 2023) on a 2-D token grid.

    q, k, v projections; RoPE on the flattened token index; per head decay ``ln γ_h = ln(1 − 2^(−a − b·h/H))``
    (``a = init_value``, ``b = heads_range``) added in log space: full ``A = softmax(s·q̃k̃ᵀ + ln γ·(|Δy| + |Δx|))``,
    or ``decomposed=True`` (RMT's early stages): attention along each row with ``ln γ·|Δx|``, then along each column
    with ``ln γ·|Δy|`` on the row outputs (same q̃, k̃), cost O(N·(H+W)). Output ``out_proj(Y + LCE(v))`` with LCE a
    5×5 depth-wise conv. Names follow the official code (q_proj, k_proj, v_proj, lepe, out_proj).
    """

    @renamed_kwargs(lce_kernel="kernel_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        init_value: float = 2.0,
        heads_range: float = 4.0,
        decomposed: bool = True,
        kernel_size: int = 5,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary position embedding")
        check_int("kernel_size", kernel_size, odd=True)
        self.decomposed = bool(decomposed)
        self.init_value, self.heads_range = float(init_value), float(heads_range)
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.lepe = nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner)
        self.out_proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    @property
    def log_gamma(self) -> torch.Tensor:
        """Per-head ``ln γ_h`` (float64), from the constructor's ``init_value`` and ``heads_range``."""
        return cached_table(log_decay, self.num_heads, self.init_value, self.heads_range)

    def decay(self, *extent: int, like: torch.Tensor) -> torch.Tensor:
        """``[heads, N, N]`` additive log-decay ``ln γ_h · distance`` for a grid (or line) of shape ``extent``."""
        distance = cached_table(distance_table, *extent).to(device=like.device, dtype=like.dtype)
        return self.log_gamma.to(device=like.device, dtype=like.dtype)[:, None, None] * distance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        v_map = self.v_proj(x)
        tables = cached_table(rotary_tables, height * width, self.head_dim)
        sin, cos = (t.to(device=x.device, dtype=x.dtype)[:, None] for t in tables)  # [N, 1, d]
        q, k, v = (
            rearrange(t, "b y x (h d) -> b (y x) h d", h=self.num_heads)
            for t in (self.q_proj(x), self.k_proj(x), v_map)
        )
        q, k = rotate_pairs(q, sin, cos), rotate_pairs(k, sin, cos)
        if not self.decomposed:
            out = attention(q, k, v, attn_mask=self.decay(height, width, like=q))
            out = rearrange(out, "b (y x) h d -> b y x (h d)", y=height)
        else:
            rows = [rearrange(t, "b (y x) h d -> (b y) x h d", y=height) for t in (q, k, v)]
            along_x = attention(*rows, attn_mask=self.decay(width, like=q))
            cols = [rearrange(t, "(b y) x h d -> (b x) y h d", y=height) for t in (rows[0], rows[1], along_x)]
            out = attention(*cols, attn_mask=self.decay(height, like=q))
            out = rearrange(out, "(b x) y h d -> b y x (h d)", x=width)
        lce = self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.out_proj(out + lce))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, init_value={self.init_value}, "
            f"heads_range={self.heads_range}, decomposed={self.decomposed}"
        )
