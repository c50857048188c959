"""Token merging (ToMe): bipartite soft matching merges similar tokens, MHSA runs on the rest, then tokens unmerge."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_int, check_probability, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["TokenMergeAttention", "bipartite_matching"]


def bipartite_matching(
    metric: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int], merged: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tomesd's 2-D bipartite soft matching without randomness: integer index tensors, no gradient.

    ``metric`` ``(B, N, C)`` on a row-major ``grid``; one destination per ``stride`` cell (its top-left token), every
    other token is a source. Each source's best destination is its most cosine-similar one; the ``merged`` sources
    with the highest similarity merge into it. Returns ``(dst_pos [num_dst], src_pos [N - num_dst], kept [B, S - r],
    merged_src [B, r], merged_dst [B, r])``: token positions of the destinations and sources, then (indices into the
    source list) the sources kept apart, those merged, and (indices into the destination list) where they go.
    """
    rows, cols = grid
    sy, sx = stride
    is_src = torch.ones(rows, cols, dtype=torch.int8, device=metric.device)
    is_src[: (rows // sy) * sy : sy, : (cols // sx) * sx : sx] = 0
    num_dst = (rows // sy) * (cols // sx)
    by_role = is_src.flatten().argsort(stable=True)  # destinations first, each group in raster order
    dst_pos, src_pos = by_role[:num_dst], by_role[num_dst:]
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # [B, S, D]
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged_src, kept = order[:, :merged], order[:, merged:]
    return dst_pos, src_pos, kept, merged_src, best_dst.gather(1, merged_src)


@register_mechanism(
    "token_merge",
    family="content-routed",
    paper="Token Merging: Your ViT But Faster (ToMe); Token Merging for Fast Stable Diffusion (tomesd)",
    year=2023,
    complexity="quadratic",
    reference="dbolya/tomesd tomesd/merge.py::bipartite_soft_matching_random2d (read); dbolya/ToMe (prop_attn)",
    receptive_field="global",
    note=(
        "Shape-keeping merge → attend → unmerge. The merge ratio sets the cost: MHSA runs over N − r tokens, "
        "r = int(ratio·N) (at most the number of sources), so the attention costs about (1 − ratio)² of mhsa. "
        "Matching as tomesd's bipartite_soft_matching_random2d with no randomness (destination = top-left token of "
        "each stride cell, similarity = cosine of the input tokens, merge = mean, unmerge = copy). The matching "
        "(max, argsort, index selection) passes no gradient; gradients flow through the merged means and the "
        "copies, so every input token gets one. proportional=True adds ToMe's proportional attention (log of the "
        "number of tokens a key stands for); tomesd leaves it out (proportional=False). ratio=0 is mhsa."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(6, 6),
)
class TokenMergeAttention(Mechanism):
    """Token merging around MHSA (Bolya et al., ToMe 2023; Bolya & Hoffman, tomesd 2023); output keeps N tokens.

    Input ``(B, H, W, C)``.

    Args:
        dim: channels in and out.
        num_heads: attention heads (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of the qkv projection.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        ratio: fraction of the N tokens merged away (tomesd default 0.5; 0 is mhsa).
        stride: cell size ``(sy, sx)`` with one destination token per cell (tomesd 2×2).
        proportional: ToMe's proportional attention (log token size added to the logits).
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
        ratio: float = 0.5,
        stride: int | tuple[int, int] = 2,
        proportional: bool = True,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.ratio = check_probability("ratio", ratio)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        if len(stride) != 2:
            raise ValueError(f"stride={stride!r} must be an int or a pair of ints")
        self.stride = (check_int("stride", stride[0]), check_int("stride", stride[1]))
        if not isinstance(proportional, bool):
            raise TypeError(f"proportional={proportional!r} must be a bool")
        self.proportional = proportional
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def attend(self, tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        bias = size.log()[:, None, None, :].to(tokens.dtype) if size is not None and self.proportional else None
        out = attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        b, c = x.shape[0], x.shape[-1]
        tokens = x.reshape(b, rows * cols, c)
        num_dst = (rows // self.stride[0]) * (cols // self.stride[1])
        merged = min(int(rows * cols * self.ratio), rows * cols - num_dst)
        if merged <= 0 or b == 0:
            return self.attend(tokens, None).reshape(x.shape)
        dst_pos, src_pos, kept, merged_src, merged_dst = bipartite_matching(tokens, (rows, cols), self.stride, merged)
        src, dst = tokens[:, src_pos], tokens[:, dst_pos]
        take = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        sums = dst.scatter_add(1, merged_dst[..., None].expand(-1, -1, c), take(src, merged_src))
        counts = torch.ones(b, dst.shape[1], dtype=x.dtype, device=x.device).scatter_add(
            1, merged_dst, torch.ones_like(merged_dst, dtype=x.dtype)
        )
        reduced = torch.cat([take(src, kept), sums / counts[..., None]], dim=1)
        size = torch.cat([torch.ones_like(kept, dtype=x.dtype), counts], dim=1)
        out = self.attend(reduced, size)
        kept_out, dst_out = out[:, : kept.shape[1]], out[:, kept.shape[1] :]
        src_out = torch.zeros_like(src)
        src_out = src_out.scatter(1, kept[..., None].expand(-1, -1, c), kept_out)
        src_out = src_out.scatter(1, merged_src[..., None].expand(-1, -1, c), take(dst_out, merged_dst))
        full = torch.zeros_like(tokens)
        full = full.index_copy(1, dst_pos, dst_out).index_copy(1, src_pos, src_out)
        return full.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, ratio={self.ratio}, stride={self.stride}"
