"""Dense attention with an optional logsumexp, and the exact merge of attentions over disjoint key sets."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from . import recording, switch
from .backends import BACKENDS
from .backends.base import compute_dtype, softmax_with_lse, values_readable
from .checks import check_scale
from .problem import check_flag, make_problem

__all__ = ["attention", "merge_attentions"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key.

    q: ``[B, *spatial_q, heads, d]``, k: ``[B, *spatial_k, heads, d]``, v: ``[B, *spatial_k, heads, d_v]``
    (spatial axes are flattened row-major). ``attn_mask`` broadcasts to ``[B, heads, N_q, N_k]``: boolean
    (True = attend) or an additive float bias; with ``is_causal`` both apply (causal: query i sees keys 0..i).
    ``dropout_p`` drops attention weights (scaling the kept ones by ``1 / (1 - dropout_p)``) whenever it is
    positive, as in ``scaled_dot_product_attention``: pass 0 in eval mode. Returns ``[B, *spatial_q, heads, d_v]``
    (and the logsumexp ``[B, *spatial_q, heads]`` of the logits, unaffected by dropout, with ``return_lse``).

    ``backend="auto"`` (or the ``use_backend`` switch, when set) picks how: ``auto`` runs torch's fused
    ``scaled_dot_product_attention`` (explicit scores with ``return_lse``), ``"reference"`` explicit scores and
    softmax, and any other engine backend runs a call with as many queries as keys, no dropout and an
    ``attn_mask`` (if any) that is the same for every query as one neighborhood covering every key
    (``kernel_size`` = token count, the mask as ``key_bias``), else raises why.
    """
    chosen = switch.resolve_backend(backend)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be [batch, *tokens, heads, head_dim]")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")
    check_flag("is_causal", is_causal)
    check_flag("return_lse", return_lse)
    check_scale(scale)
    if k.shape[0] != q.shape[0] or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"k.shape={tuple(k.shape)} must match q.shape={tuple(q.shape)} in batch, heads and head_dim")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v.shape={tuple(v.shape)} must match k.shape={tuple(k.shape)} except in the last dim")
    b, h = q.shape[0], q.shape[-2]
    scores_shape = (b, h, math.prod(q.shape[1:-2]), math.prod(k.shape[1:-2]))
    attn_mask = _checked_attn_mask(attn_mask, scores_shape, q.device)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p={dropout_p!r} must be a float with 0 <= dropout_p < 1")
    qf = q.reshape(b, -1, h, q.shape[-1]).transpose(1, 2)
    kf = k.reshape(b, -1, h, k.shape[-1]).transpose(1, 2)
    vf = v.reshape(b, -1, h, v.shape[-1]).transpose(1, 2)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = _combined_mask(attn_mask, is_causal, scores_shape[-2:], q.device)
    if recording.is_recording():
        recording.check_size(qf.shape[-2], kf.shape[-2])
        with torch.no_grad():
            weights, _ = softmax_with_lse(_masked_scores(qf.float(), kf.float(), scale, mask))
            recording.add("attention", weights, q.shape[1:-2], k.shape[1:-2])
    if chosen == "auto" and not return_lse and _explicit_is_faster(qf, vf, mask, dropout_p):
        switch.note("attention", "explicit")
        scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale).add_(mask.to(q.dtype))
        out = torch.matmul(scores.softmax(dim=-1), vf)
        return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    if chosen == "auto" and not return_lse:
        switch.note("attention", "sdpa")
        causal_only = is_causal and attn_mask is None
        if causal_only:
            mask = None  # SDPA applies is_causal itself (and may pick a causal kernel)
        elif mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA wants a float mask in q's dtype
        qf, kf, vf = _fused_cpu_layout(qf, kf, vf)
        out = F.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=mask, is_causal=causal_only, dropout_p=dropout_p, scale=scale
        )
        return out[..., : v.shape[-1]].transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    if chosen in ("auto", "reference"):
        switch.note("attention", "reference")
        ct = compute_dtype(q.dtype)
        weights, lse = softmax_with_lse(_masked_scores(qf.to(ct), kf.to(ct), scale, mask))
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, vf.to(ct)).to(q.dtype)
        out = out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
        lse = lse.transpose(1, 2).reshape(q.shape[:-1])
    else:
        out, lse = _full_neighborhood(
            chosen, backend, q, k, v, float(scale), attn_mask, is_causal, dropout_p, return_lse
        )
    return (out, lse) if return_lse else out


def _full_neighborhood(name, backend, q, k, v, scale, attn_mask, is_causal, dropout_p, return_lse):
    """Dense attention on engine backend ``name`` as one 1-D neighborhood holding every key, or a ValueError
    naming the backend and every reason it cannot."""
    b, h = q.shape[0], q.shape[-2]
    n_q, n_k = math.prod(q.shape[1:-2]), math.prod(k.shape[1:-2])
    reasons = []
    if n_q != n_k:
        reasons.append(f"queries and keys differ in number ({n_q} and {n_k})")
    elif n_k < 2:
        reasons.append(f"a neighborhood needs at least 2 keys, got {n_k}")
    if attn_mask is not None and attn_mask.shape[-2] != 1:
        reasons.append("attn_mask varies over queries (such a mask runs on backend='reference' or 'auto')")
    if dropout_p > 0:
        reasons.append(f"dropout_p={dropout_p} > 0")
    problem = key_bias = None
    if not reasons:
        flat = [t.reshape(b, n_k, h, t.shape[-1]) for t in (q, k, v)]
        if attn_mask is not None:  # one mask row for every query: a per-key bias [B|1, N_k, heads|1]
            key_bias = attn_mask[:, :, 0, :].transpose(1, 2)
            key_bias = key_bias.to(q.dtype) if key_bias.is_floating_point() else _bool_to_bias(key_bias, q.dtype)
        problem = make_problem(
            *flat, n_k, 1 if is_causal else n_k, 1, is_causal, return_lse=return_lse, key_bias=key_bias
        )
        reasons = BACKENDS[name].not_supported_reasons(problem)
    if reasons:
        source = "" if backend == name else f" ({switch.forced_by(name)})"
        raise ValueError(f"backend={name!r} cannot run this attention call: " + "; ".join(reasons) + source)
    switch.note("attention", name)
    out, lse = BACKENDS[name].run(
        *flat, problem, scale=scale, additional_keys=None, additional_values=None, rel_pos_bias=None, key_bias=key_bias
    )
    out = out.reshape(*q.shape[:-1], v.shape[-1])
    return out, (lse.reshape(q.shape[:-1]) if return_lse else None)


def _bool_to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive bias: 0 where allowed, -inf elsewhere."""
    return torch.full(allowed.shape, float("-inf"), dtype=dtype, device=allowed.device).masked_fill(allowed, 0.0)


def _explicit_is_faster(qf: torch.Tensor, vf: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether ``auto`` computes explicit scores (matmul, bias, softmax, matmul) instead of SDPA: on CPU, with an
    additive float bias and no dropout, when q/k and v widths differ or the bias needs a gradient. SDPA's fused
    CPU kernel then needs zero-padded copies of q/k (or v), or it falls back to its slower math path with a
    NaN-safe softmax. On EfficientViT's cascaded group attention (49 tokens, q/k width 16) one forward took 329 µs
    with explicit scores against 774 µs with SDPA on padded q/k, in one run; with it ``cascaded_group`` is 1.03×
    timm's ``LocalWindowAttention`` forward and 1.06× forward+backward (``benchmarks/vs_timm.py``, 1 thread).
    A bias with a row of only -inf keeps SDPA, whose fully masked rows give 0 where a plain softmax gives NaN; -inf
    elsewhere (Swin's shifted-window regions, whose diagonal is always allowed) is exact in a plain softmax."""
    if qf.device.type != "cpu" or mask is None or not mask.is_floating_point() or dropout_p > 0:
        return False
    if not values_readable(mask) or not (
        qf.shape[-1] != vf.shape[-1] or (mask.requires_grad and torch.is_grad_enabled())
    ):
        return False
    row_peaks = _unbroadcast(mask).detach().amax(-1)  # -inf for a row masked entirely: NaN in a plain softmax
    return not bool(torch.isneginf(row_peaks).any())


def _unbroadcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its broadcast (stride-0) axes cut to length 1: the same values, each stored value read once."""
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def _fused_cpu_layout(qf, kf, vf):
    """On CPU, q/k/v as SDPA's fused kernel takes them: one head width (zero-padding q/k or v) and a unit stride
    along it; otherwise SDPA falls back to explicit scores and a masked softmax, several times slower. Zero columns
    add nothing to ``q·k`` (the scale is passed explicitly) and the extra output columns are dropped."""
    if qf.device.type != "cpu":
        return qf, kf, vf
    qf, kf, vf = (t if t.stride(-1) == 1 else t.contiguous() for t in (qf, kf, vf))
    width_qk, width_v = qf.shape[-1], vf.shape[-1]
    if width_qk < width_v:
        return F.pad(qf, (0, width_v - width_qk)), F.pad(kf, (0, width_v - width_qk)), vf
    if width_v < width_qk:
        return qf, kf, F.pad(vf, (0, width_qk - width_v))
    return qf, kf, vf


def _checked_attn_mask(
    attn_mask: torch.Tensor | None, scores_shape: tuple[int, int, int, int], device: torch.device
) -> torch.Tensor | None:
    """``attn_mask`` (a bool or floating tensor that broadcasts to ``[B, heads, N_q, N_k]``) viewed as 4-D, since
    ``scaled_dot_product_attention`` wants a mask of at least 2 dims."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask.dtype={attn_mask.dtype} must be torch.bool or a floating-point dtype")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask.device={attn_mask.device} must equal q.device={device}")
    shape = tuple(attn_mask.shape)
    fits = len(shape) <= 4 and all(s in (1, t) for s, t in zip(reversed(shape), reversed(scores_shape)))
    if not fits:
        raise ValueError(f"attn_mask.shape={shape} must broadcast to [B, heads, N_q, N_k] = {list(scores_shape)}")
    return attn_mask.reshape((1,) * (4 - len(shape)) + shape)


def _combined_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, size: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """One mask for ``attn_mask`` and ``is_causal`` together (None if neither); the causal part is
    ``tril`` of an ``N_q × N_k`` matrix, aligned top-left as in ``scaled_dot_product_attention``."""
    if not is_causal:
        return attn_mask
    causal = torch.ones(size, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return torch.where(causal, attn_mask, float("-inf"))


def _masked_scores(qf, kf, scale, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, h, Nq, Nk]`` logits with ``mask`` applied: boolean (-inf where False) or added as a bias."""
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.to(scores.dtype)


def merge_attentions(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of disjoint key sets, from per-set outputs and logsumexps.

    ``outputs[i]``: ``[..., d_v]``, ``lses[i]``: ``[...]`` (the same leading shape). Returns ``(output, lse)``
    with ``lse = log Σ_i exp(lse_i)`` and ``output = Σ_i exp(lse_i - lse) · outputs[i]``. A set with
    ``lse = -inf`` (no keys) contributes nothing. Differentiable in outputs and lses.
    """
    for name, seq in (("outputs", outputs), ("lses", lses)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors (one per key set), got {type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if len(outputs) != len(lses) or len(outputs) == 0:
        raise ValueError(f"merge_attentions needs as many outputs as lses (>= 1), got {len(outputs)} and {len(lses)}")
    for i, (o, lse) in enumerate(zip(outputs, lses)):
        if o.shape[:-1] != lse.shape:
            raise ValueError(f"outputs[{i}].shape={tuple(o.shape)} must be lses[{i}].shape={tuple(lse.shape)} + [d_v]")
        if o.shape != outputs[0].shape:
            raise ValueError(
                f"outputs[{i}].shape={tuple(o.shape)} differs from outputs[0].shape={tuple(outputs[0].shape)}"
            )
        for name, t in ((f"outputs[{i}]", o), (f"lses[{i}]", lse)):
            if not t.is_floating_point():
                raise TypeError(f"{name}.dtype={t.dtype} must be a floating-point dtype")
            if t.device != outputs[0].device:
                raise ValueError(f"{name}.device={t.device} must equal outputs[0].device={outputs[0].device}")
        if o.dtype != outputs[0].dtype:
            raise TypeError(f"outputs[{i}].dtype={o.dtype} must equal outputs[0].dtype={outputs[0].dtype}")
    ct = compute_dtype(outputs[0].dtype)
    weights, total = softmax_with_lse(torch.stack([lse.to(ct) for lse in lses]), dim=0)
    out = sum(w.unsqueeze(-1) * o.to(ct) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), total
