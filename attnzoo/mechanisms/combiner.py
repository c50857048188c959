"""Combiner: full attention at sub-quadratic cost, direct keys of the own window plus one summary per other window."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention, merge_attentions, neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism


@register_mechanism(
    "combiner",
    family="local",
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    year=2021,
    complexity="N·k",
    reference="official google-research/google-research combiner/combiner/jax/model/layer.py (_SelfAttLogn, "
    "_AxialMixtureAtt)",
    receptive_field="global",
    note="2-D non-causal port of Combiner-Fixed as the official JAX layers compute it: a region's summary key is "
    "the max over its keys, its summary value is the attention of the max-pooled region query over the region's "
    "keys and values; the query's own window (direct keys) and the summaries of every other window share one "
    "softmax, computed as two engine calls joined by merge_attentions. No log-size correction, as in the code",
    test_kwargs={"window_size": 4, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class CombinerAttention(Mechanism):
    """Combiner (Ren et al., NeurIPS 2021), fixed-partition form on a 2-D grid.

    The grid is cut into non-overlapping ``window_size`` windows. A query attends directly to every key of its
    own window and, through one summary token each, to every other window: ``p(j | i) = p(Ω | i) · p(j | Ω)``, with
    ``p(Ω | i)`` from the logit of the summary key ``max_{j∈Ω} k_j`` in the same softmax as the direct keys and
    ``p(j | Ω)`` the attention of the summary query ``max_{j∈Ω} q_j`` inside Ω. Every output depends on every
    token at cost ``N·(w² + N / w²)``. Extents are zero-padded to whole windows (padded tokens take no part).

    Args:
        dim: channels. num_heads, head_dim: heads (default ``dim // 32``) and per-head width. window_size: window
        extent (7). qkv_bias: bias of ``qkv``. attn_drop: must be 0. proj_drop: output dropout. backend: engine
        backend of the direct part.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | Sequence[int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size = normalize_axis_arg("window_size", window_size, 2, minimum=2)
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        (mh, mw) = self.window_size
        padding = pad_to_multiple(spatial, self.window_size)
        q, k, v = split_qkv(self.qkv(padding.pad(x)), self.num_heads)
        key_bias = padding.key_bias(q.dtype, q.device)
        direct, direct_lse = neighborhood_attention(
            q, k, v, self.window_size, self.window_size, key_bias=key_bias, return_lse=True, backend=self.backend
        )
        # region summaries (padded tokens excluded from the max-pools and the inner attention)
        grid = dict(mh=mh, mw=mw)
        real = padding.valid_mask(q.device)
        real_win = rearrange(real, "(nh mh) (nw mw) -> (nh nw) (mh mw)", **grid)  # [R, w]
        hide = (~real_win)[None, :, :, None, None]
        q_win, k_win, v_win = (
            rearrange(t, "b (nh mh) (nw mw) h d -> b (nh nw) (mh mw) h d", **grid) for t in (q, k, v)
        )
        summary_k = k_win.masked_fill(hide, float("-inf")).amax(2)  # [B, R, h, d]
        summary_q = q_win.masked_fill(hide, float("-inf")).amax(2)
        b, regions = q.shape[0], real_win.shape[0]
        summary_v = attention(
            summary_q.reshape(b * regions, 1, self.num_heads, -1),
            k_win.flatten(0, 1),
            v_win.flatten(0, 1),
            attn_mask=real_win.repeat(b, 1)[:, None, None, :],
        ).reshape(b, regions, self.num_heads, -1)
        # every query sees the summaries of the windows other than its own
        region_of_query = (
            torch.arange(regions, device=q.device)
            .reshape(padding.padded_shape[0] // mh, 1, padding.padded_shape[1] // mw, 1)
            .expand(-1, mh, -1, mw)
            .reshape(-1)
        )
        other = region_of_query[:, None] != torch.arange(regions, device=q.device)[None, :]
        far, far_lse = attention(q, summary_k, summary_v, attn_mask=other, return_lse=True)
        out, _ = merge_attentions([direct, far], [direct_lse, far_lse])
        return self.proj_drop(self.proj(merge_heads(padding.crop(out))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
