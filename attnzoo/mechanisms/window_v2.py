"""Swin Transformer V2 window attention: scaled cosine attention with a log-spaced continuous position bias."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import effective_shift, flip_table, offset_windows, window_and_shift
from .registry import register_mechanism


def log_spaced_offsets(window: tuple[int, ...], norm_window: tuple[int, ...]) -> torch.Tensor:
    """``[*(2w-1), rank]`` relative offsets (query − key) of a ``window``, divided by ``norm_window - 1`` (the
    pre-training window, for resolution transfer), scaled to [-8, 8] and log-spaced (Swin V2 eq. 4)."""
    axes = [torch.arange(-(w - 1), w, dtype=torch.float64) / max(p - 1, 1) * 8 for w, p in zip(window, norm_window)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)


@register_mechanism(
    "window_v2",
    family="local",
    paper="Swin Transformer V2: Scaling Up Capacity and Resolution",
    year=2022,
    complexity="N·k",
    reference="timm.models.swin_transformer_v2.WindowAttention",
    receptive_field="local",
    test_kwargs={"window_size": 4, "shift_size": 2, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class WindowAttentionV2(Mechanism):
    """Swin V2 (shifted) window attention (Liu et al., Swin Transformer V2, CVPR 2022).

    Logits are ``cos(q, k) · τ_h`` with a learned per-head temperature (``logit_scale``, clamped at log 100) plus
    ``16·σ(CPB(Δ))``: a 2-layer MLP of the log-spaced relative offset Δ (the continuous position bias). Windows,
    shifts and end padding (masked keys) are as in ``window``. The parameters have timm's names and shapes
    (``qkv`` without bias plus ``q_bias``/``v_bias``, ``logit_scale``, ``cpb_mlp``), so its weights load as is.

    Args:
        dim: channels. num_heads, head_dim: heads (default ``dim // 32``) and per-head width.
        window_size, shift_size: window extent and shift (one value or one per axis). qkv_bias: q and v biases.
        attn_drop: must be 0 (fused op). proj_drop: output dropout. cpb_hidden: width of the CPB MLP (512).
        pretrained_window_size: window used to normalise the offsets (0: the current window).
        rank: spatial axes (1, 2 or 3). backend: engine backend.
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
        window_size: int | Sequence[int] = 8,
        shift_size: int | Sequence[int] = 0,
        cpb_hidden: int = 512,
        pretrained_window_size: int | Sequence[int] = 0,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, rank)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size, self.shift_size = window_and_shift(window_size, shift_size, rank)
        pretrained = normalize_axis_arg("pretrained_window_size", pretrained_window_size, rank, minimum=0)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.logit_scale = nn.Parameter(torch.full((self.num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(rank, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, self.num_heads, bias=False)
        )
        norm_window = tuple(p if p > 0 else m for p, m in zip(pretrained, self.window_size))
        offsets = log_spaced_offsets(self.window_size, norm_window)
        self.register_buffer("relative_coords_table", offsets.float(), persistent=False)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``[heads, *(2w-1)]`` bias ``16·σ(CPB(Δ))`` indexed by key − query (the engine's convention)."""
        table = self.cpb_mlp(self.relative_coords_table.to(dtype))  # [*(2w-1), heads], query - key
        table = 16 * torch.sigmoid(table.movedim(-1, 0))
        return flip_table(table, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        window = self.window_size
        padding = offset_windows(spatial, window, effective_shift(self.shift_size, window, spatial))
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        # the offset and end tokens are masked keys and cropped queries: project only the real tokens, then pad
        q, k, v = (padding.pad(t) for t in split_qkv(F.linear(x, self.qkv.weight, bias), self.num_heads))
        tau = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().reshape(self.num_heads, 1)
        q = F.normalize(q, dim=-1) * tau.to(q.dtype)
        out = neighborhood_attention(
            q,
            F.normalize(k, dim=-1),
            v,
            window,
            window,
            scale=1.0,
            rel_pos_bias=self.position_bias(q.dtype),
            key_bias=padding.key_bias(q.dtype, q.device),
            backend=self.backend,
        )
        return self.proj_drop(self.proj(merge_heads(padding.crop(out))))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"
        )
