"""Qihoo-T2X proxy tokens: one token per window stands for it in global attention, broadcast back by cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_choice, check_int, check_probability, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["ProxyTokenAttention"]


@register_mechanism(
    "proxy_tokens",
    family="summary-token",
    paper="Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens for Text-to-Any-Task (PT-DiT)",
    year=2024,
    complexity="quadratic",
    reference="paper (Wang et al., 2024), global information interaction module; no code was found to read",
    receptive_field="global",
    note=(
        "From the paper's description (no code available): the grid is cut into window_size windows (padded at the "
        "bottom/right); one proxy per window: by default the window mean (sampling='mean', deterministic, every token "
        "feeds its proxy); sampling='random' is the paper's randomly sampled token per window in training, with the "
        "window's centre token in eval; MHSA among the proxies (with a residual, our choice); then every token "
        "cross-attends to the updated proxies (own q, kv and output projections). The paper's window / "
        "shifted-window attention (its detail branch) is the separate `window` "
        "mechanism. Cost O(N·N/window²)."
    ),
    test_kwargs={"num_heads": 2, "window_size": 2},
    test_size=(6, 6),
    size_args={"window_size": "extent"},
)
class ProxyTokenAttention(Mechanism):
    """Proxy-token attention (Wang et al., Qihoo-T2X / PT-DiT, 2024): global attention through one proxy per window.

    Input ``(B, H, W, C)``.

    Args:
        dim: channels in and out.
        num_heads: attention heads of both attentions (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of the q/k/v projections.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projections.
        window_size: side of the window one proxy stands for.
        sampling: ``"mean"`` (the window mean) or ``"random"`` (the paper: a random token per window in training, the
            centre token in eval).
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 2,
        sampling: str = "mean",
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.window_size = check_int("window_size", window_size)
        self.sampling = check_choice("sampling", sampling, ("random", "mean"))
        inner = self.num_heads * self.head_dim
        self.proxy_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proxy_proj = nn.Linear(inner, dim)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def proxies(self, x: torch.Tensor) -> torch.Tensor:
        """One token per window, ``(B, windows, C)``."""
        ws = self.window_size
        pad_rows, pad_cols = -x.shape[1] % ws, -x.shape[2] % ws
        padded = F.pad(x, (0, 0, 0, pad_cols, 0, pad_rows))
        windows = rearrange(padded, "b (y i) (x j) c -> b (y x) (i j) c", i=ws, j=ws)
        if self.sampling == "mean":  # over the window's tokens, padding excluded
            valid = F.pad(x.new_ones(1, x.shape[1], x.shape[2], 1), (0, 0, 0, pad_cols, 0, pad_rows))
            count = rearrange(valid, "b (y i) (x j) c -> b (y x) (i j) c", i=ws, j=ws).sum(dim=2)
            return windows.sum(dim=2) / count
        if self.training:
            pick = torch.randint(ws * ws, (x.shape[0], windows.shape[1], 1, 1), device=x.device)
        else:
            pick = torch.full((1, 1, 1, 1), (ws // 2) * ws + ws // 2, device=x.device)
        pick = pick.expand(x.shape[0], windows.shape[1], 1, x.shape[-1])
        return windows.gather(2, pick).squeeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        drop = self.attn_drop if self.training else 0.0
        proxies = self.proxies(x)
        pq, pk, pv = split_qkv(self.proxy_qkv(proxies), self.num_heads)
        proxies = proxies + self.proxy_proj(merge_heads(attention(pq, pk, pv, dropout_p=drop)))
        q = rearrange(self.q(x), "b y x (h d) -> b y x h d", h=self.num_heads)
        k, v = rearrange(self.kv(proxies), "b n (two h d) -> two b n h d", two=2, h=self.num_heads)
        out = attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, sampling={self.sampling!r}"
