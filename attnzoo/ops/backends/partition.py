"""Perfectly block-sparse cases as a reshape plus ``scaled_dot_product_attention``.

A relative position bias becomes one ``[heads, K, K]`` additive mask shared by all windows.

When ``stride == kernel_size`` and every extent is a multiple of ``kernel_size·dilation``, each dilation group
splits into non-overlapping windows of exactly ``kernel_size`` tokens (Swin windows, MaxViT block and grid, CrossFormer
SDA/LDA). A causal axis becomes a lower-triangular mask inside the window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..geometry import combine_axes
from ..problem import NAProblem
from .base import Backend, compute_dtype, softmax_with_lse, values_readable

_AXES = "xyz"


def _pattern(rank: int) -> tuple[str, str]:
    """einops patterns: axis a of extent n·k·d is split as (n k d); a window is (n, d), its tokens are k."""
    split = " ".join(f"(n{a} k{a} d{a})" for a in _AXES[:rank])
    windows = " ".join(f"n{a} d{a}" for a in _AXES[:rank])
    tokens = " ".join(f"k{a}" for a in _AXES[:rank])
    return f"b {split} h c", f"(b {windows}) h ({tokens}) c"


def _causal_mask(kernel: tuple[int, ...], causal: tuple[bool, ...], device) -> torch.Tensor | None:
    """Inside a window a causal axis sees only earlier-or-equal positions (NATTEN with stride = kernel)."""
    if not any(causal):
        return None
    axes = [
        torch.ones(k, k, dtype=torch.bool).tril() if c else torch.ones(k, k, dtype=torch.bool)
        for k, c in zip(kernel, causal)
    ]
    return combine_axes(axes, torch.logical_and).to(device)


def _window_rel_index(kernel: tuple[int, ...]) -> torch.Tensor:
    """``[K, K]`` flat index into a ``[*(2k-1)]`` table of in-window offsets key − query (same for every window)."""
    index = None
    for k in kernel:
        r = torch.arange(k)
        axis = r[None, :] - r[:, None] + k - 1
        if index is None:
            index = axis
        else:
            n = index.shape[0]
            index = (index[:, None, :, None] * (2 * k - 1) + axis[None, :, None, :]).reshape(n * k, n * k)
    return index


def _may_mask_whole_rows(rel_pos_bias: torch.Tensor | None) -> bool:
    """Whether a rel_pos_bias might hold -inf (so a plain softmax could see a row of only -inf): checked in eager
    mode (one pass over the small table), assumed when the values cannot be read (traced, meta or fake tensors)."""
    if rel_pos_bias is None:
        return False
    return not values_readable(rel_pos_bias) or bool(torch.isneginf(rel_pos_bias).any())


def _propagate_nan_queries(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """SDPA's fused CPU kernel turns a NaN query row into finite output; the reference gives NaN. In eager mode one
    sum over ``q`` (a read pass) decides whether the exact row fix-up is needed at all (a NaN anywhere makes the sum
    NaN); traced, the fix-up is always applied (no data-dependent branch)."""
    if values_readable(q) and not bool(q.sum().isnan()):
        return out
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))


class PartitionBackend(Backend):
    name = "partition"
    description = "non-overlapping windows (stride = kernel, divisible extents): reshape + SDPA"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        p = problem
        reasons = []
        for axis, (extent, k, s, d) in enumerate(zip(p.spatial_shape, p.kernel_size, p.stride, p.dilation)):
            if s != k:
                reasons.append(f"needs stride == kernel_size, got stride={s}, kernel_size={k} along axis {axis}")
            if extent % (k * d):
                reasons.append(
                    f"needs extents divisible by kernel_size·dilation={k * d}, got {extent} along axis {axis}"
                )
        return reasons

    def uses_sdpa(self, problem: NAProblem) -> bool:
        """Whether ``run`` takes its ``scaled_dot_product_attention`` path (no key_bias, no lse to return); with
        either it computes the scores explicitly, which is slower than the fused kernel."""
        return not problem.has_key_bias and not problem.return_lse

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        p = problem
        split, windows = _pattern(p.rank)
        sizes = {}
        for a, kk, d in zip(_AXES, p.kernel_size, p.dilation):
            sizes.update({f"k{a}": kk, f"d{a}": d})
        ct = compute_dtype(q.dtype) if (p.return_lse or key_bias is not None) else q.dtype
        qw, kw, vw = (rearrange(t.to(ct), f"{split} -> {windows}", **sizes) for t in (q, k, v))
        n_windows = qw.shape[0] // p.batch
        mask = _causal_mask(p.kernel_size, p.is_causal, q.device)
        if additional_keys is not None:
            extra = lambda t: rearrange(t.to(ct), "b n h c -> b h n c").repeat_interleave(n_windows, 0)  # noqa: E731
            kw = torch.cat([kw, extra(additional_keys)], dim=2)
            vw = torch.cat([vw, extra(additional_values)], dim=2)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], additional_keys.shape[1])], dim=1)
        bias = None
        if key_bias is not None:
            kb = key_bias.expand(p.batch, *p.spatial_shape, p.heads).to(qw.dtype).unsqueeze(-1)
            bias = rearrange(kb, f"{split} -> {windows}", **sizes).transpose(-1, -2)  # [B·W, h, 1, K]
            if additional_keys is not None:
                bias = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], additional_keys.shape[1])], dim=-1)
        if rel_pos_bias is not None:
            # with stride == kernel the key − query offsets inside a window are the same in every window
            table = rel_pos_bias.to(qw.dtype).reshape(p.heads, -1)[:, _window_rel_index(p.kernel_size).to(q.device)]
            if additional_keys is not None:
                table = torch.cat([table, table.new_zeros(*table.shape[:-1], additional_keys.shape[1])], dim=-1)
            bias = table.unsqueeze(0) if bias is None else bias + table.unsqueeze(0)
        records_grad = p.requires_grad
        exact_softmax = records_grad and _may_mask_whole_rows(rel_pos_bias)
        if p.return_lse or key_bias is not None or math.isnan(scale) or exact_softmax:
            scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale
            if bias is not None:
                scores = scores + bias
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights, lse = softmax_with_lse(scores)
            out = torch.matmul(weights, vw)
        elif records_grad:
            # with autograd on, CPU SDPA takes its math path (explicit scores plus a NaN-safe softmax that costs
            # ~25 % more than a plain one); the plain explicit form is faster, backward included. Every row keeps a
            # finite score: the causal mask keeps the diagonal, and a rel_pos_bias holding -inf (which could mask all
            # of a row's keys) takes the NaN-safe branch above.
            ct = compute_dtype(q.dtype)
            scores = torch.matmul(qw.to(ct), kw.to(ct).transpose(-1, -2)) * scale
            if bias is not None:
                scores = scores + bias.to(ct)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(dim=-1), vw.to(ct))
            lse = None
        else:
            if bias is not None and mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            # nothing is recorded, so detached inputs change nothing: SDPA would take its slow math path for inputs
            # that merely require grad (a no_grad call on leaf tensors)
            qw, kw, vw = qw.detach(), kw.detach(), vw.detach()
            attn_mask = mask if bias is None else bias.detach()
            out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_mask, scale=scale)
            out = _propagate_nan_queries(out, qw)
            lse = None
        grid = {
            f"n{a}": extent // (kk * d) for a, extent, kk, d in zip(_AXES, p.spatial_shape, p.kernel_size, p.dilation)
        }
        out = rearrange(out, f"{windows} -> {split}", **sizes, **grid).to(q.dtype)
        if lse is not None and p.return_lse:
            lse = rearrange(lse.unsqueeze(-1), f"{windows} -> {split}", **sizes, **grid).squeeze(-1)
        return out, (lse if p.return_lse else None)
