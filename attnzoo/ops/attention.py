"""Dense attention with an optional logsumexp, and the exact merge of attentions over disjoint key sets."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import recording
from .backends.base import compute_dtype, finite_or_zero

__all__ = ["attention", "merge_attentions"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key.

    q: ``[B, *spatial_q, heads, d]``, k: ``[B, *spatial_k, heads, d]``, v: ``[B, *spatial_k, heads, d_v]``
    (spatial axes are flattened row-major). ``attn_mask`` broadcasts to ``[B, heads, N_q, N_k]``: boolean
    (True = attend) or an additive float bias. Returns ``[B, *spatial_q, heads, d_v]`` (and the logsumexp
    ``[B, *spatial_q, heads]`` with ``return_lse``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be [batch, *tokens, heads, head_dim]")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[0] != q.shape[0] or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"k.shape={tuple(k.shape)} must match q.shape={tuple(q.shape)} in batch, heads and head_dim")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v.shape={tuple(v.shape)} must match k.shape={tuple(k.shape)} except in the last dim")
    b, h = q.shape[0], q.shape[-2]
    qf = q.reshape(b, -1, h, q.shape[-1]).transpose(1, 2)
    kf = k.reshape(b, -1, h, k.shape[-1]).transpose(1, 2)
    vf = v.reshape(b, -1, h, v.shape[-1]).transpose(1, 2)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if recording.is_recording():
        with torch.no_grad():
            weights = torch.softmax(_masked_scores(qf.float(), kf.float(), scale, attn_mask, is_causal), dim=-1)
            recording.add("attention", weights.nan_to_num(0.0), q.shape[1:-2], k.shape[1:-2])
    if not return_lse:
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    ct = compute_dtype(q.dtype)
    scores = _masked_scores(qf.to(ct), kf.to(ct), scale, attn_mask, is_causal)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - finite_or_zero(lse).unsqueeze(-1))
    out = torch.matmul(weights, vf.to(ct)).to(q.dtype)
    out = out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    return out, lse.transpose(1, 2).reshape(q.shape[:-1])


def _masked_scores(qf, kf, scale, attn_mask, is_causal) -> torch.Tensor:
    """``[B, h, Nq, Nk]`` logits with the causal and user masks applied (-inf where masked)."""
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def merge_attentions(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of disjoint key sets, from per-set outputs and logsumexps.

    ``outputs[i]``: ``[..., d_v]``, ``lses[i]``: ``[...]`` (the same leading shape). Returns ``(output, lse)``
    with ``lse = log Σ_i exp(lse_i)`` and ``output = Σ_i exp(lse_i - lse) · outputs[i]``. A set with
    ``lse = -inf`` (no keys) contributes nothing. Differentiable in outputs and lses.
    """
    if len(outputs) != len(lses) or len(outputs) == 0:
        raise ValueError(f"merge_attentions needs as many outputs as lses (>= 1), got {len(outputs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape[:-1] != l.shape:
            raise ValueError(f"outputs[{i}].shape={tuple(o.shape)} must be lses[{i}].shape={tuple(l.shape)} + [d_v]")
        if o.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}].shape={tuple(o.shape)} differs from outputs[0].shape={tuple(outputs[0].shape)}")
    ct = compute_dtype(outputs[0].dtype)
    stacked = torch.stack([l.to(ct) for l in lses])
    total = torch.logsumexp(stacked, dim=0)
    safe_total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weights = torch.exp(stacked - safe_total)
    out = sum(w.unsqueeze(-1) * o.to(ct) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), total
