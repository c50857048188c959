"""Retention (RetNet / ViR): causal linear attention with a per-head exponential decay, in three equal forms.

The three functional forms take ``q, k, v`` as ``[B, N, heads, d]`` (``v`` may have its own last dim) and a decay
``gamma`` of shape ``[heads]`` and return ``[B, N, heads, d_v]``; fp16/bf16 inputs are computed in fp32:

- ``retention_parallel``: ``O = (s·QKᵀ ⊙ D)V`` with ``D[n, m] = γ^(n−m)·[n ≥ m]`` (the definition, O(N²)).
- ``retention_recurrent``: ``S_n = γ·S_{n−1} + k_nᵀv_n``, ``o_n = s·q_n S_n`` (one token at a time, O(N·d²)).
- ``retention_chunkwise``: parallel inside chunks of ``chunk_size`` tokens; the state entering every chunk is a
  decayed sum of the per-chunk states, computed for all chunks at once (no loop over chunks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_choice, check_int, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["retention_parallel", "retention_recurrent", "retention_chunkwise", "retnet_gammas", "MultiScaleRetention"]

MODES = ("quadratic", "chunkwise", "recurrent")


def _powers(gamma: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``gamma[h] ** exponent[...]`` for exponent ≥ 0, zero where exponent < 0; ``0 ** 0 = 1``."""
    g = gamma.reshape(-1, *([1] * exponent.dim()))
    return torch.where(exponent >= 0, g ** exponent.clamp_min(0).to(gamma.dtype), torch.zeros((), dtype=gamma.dtype))


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, scale: float | None):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [batch, tokens, heads, head_dim] with equal leading dims, got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    ct = compute_dtype(q.dtype)
    gamma = torch.as_tensor(gamma, device=q.device).to(ct).reshape(-1)
    if gamma.numel() != q.shape[2]:
        raise ValueError(f"gamma has {gamma.numel()} entries, must have one per head (heads={q.shape[2]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q.to(ct), k.to(ct), v.to(ct), gamma, scale


def retention_parallel(q, k, v, gamma, scale: float | None = None) -> torch.Tensor:
    """Reference form: ``O = (s·QKᵀ ⊙ D)V``, ``D[n, m] = γ_h^(n−m)`` for ``n ≥ m`` else 0."""
    dtype = q.dtype
    q, k, v, gamma, scale = _prepare(q, k, v, gamma, scale)
    pos = torch.arange(q.shape[1], device=q.device)
    decay = _powers(gamma, pos[:, None] - pos[None, :])  # [h, N, N]
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale * decay
    return torch.einsum("bhnm,bmhe->bnhe", scores, v).to(dtype)


def retention_recurrent(q, k, v, gamma, scale: float | None = None) -> torch.Tensor:
    """Recurrent form: ``S_n = γ·S_{n−1} + k_nᵀ v_n``, ``o_n = s·q_n S_n``."""
    dtype = q.dtype
    q, k, v, gamma, scale = _prepare(q, k, v, gamma, scale)
    b, n, h, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    g = gamma[:, None, None]
    outputs = []
    for t in range(n):
        state = g * state + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, t] * scale, state))
    return torch.stack(outputs, dim=1).to(dtype)


def retention_chunkwise(q, k, v, gamma, scale: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """Chunkwise form (RetNet eq. 7) for any ``chunk_size`` (the sequence is zero-padded to a multiple).

    Inside chunk i: ``(s·Q_iK_iᵀ ⊙ D)V_i``; across chunks: ``(s·Q_i R_{i−1}) ⊙ ξ``, ``ξ_j = γ^(j+1)``, with
    ``R_{i−1} = Σ_{m<i} γ^(B·(i−1−m)) U_m`` and ``U_m = K_mᵀ(V_m ⊙ ζ)``, ``ζ_j = γ^(B−1−j)``.
    """
    check_int("chunk_size", chunk_size)
    dtype = q.dtype
    q, k, v, gamma, scale = _prepare(q, k, v, gamma, scale)
    n = q.shape[1]
    pad = -n % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))  # zero keys/values add nothing
    q, k, v = (rearrange(t, "b (m c) h d -> b m c h d", c=chunk_size) for t in (q, k, v))
    pos = torch.arange(chunk_size, device=q.device)
    chunks = torch.arange(q.shape[1], device=q.device)
    inner = _powers(gamma, pos[:, None] - pos[None, :])  # [h, c, c]
    zeta = _powers(gamma, chunk_size - 1 - pos)  # [h, c]
    xi = _powers(gamma, pos + 1)  # [h, c]
    across = _powers(gamma, chunk_size * (chunks[:, None] - 1 - chunks[None, :]))  # [h, M, M], zero for m ≥ i

    scores = torch.einsum("bmihd,bmjhd->bmhij", q, k) * scale * inner
    intra = torch.einsum("bmhij,bmjhe->bmihe", scores, v)
    states = torch.einsum("bmjhd,hj,bmjhe->bmhde", k, zeta, v)  # U_m
    incoming = torch.einsum("hij,bjhde->bihde", across, states)  # R_{i-1}
    inter = torch.einsum("bmihd,bmhde->bmihe", q * scale, incoming) * rearrange(xi, "h c -> c h 1")
    out = rearrange(intra + inter, "b m c h e -> b (m c) h e")
    return out[:, :n].to(dtype)


def retnet_gammas(num_heads: int) -> torch.Tensor:
    """RetNet's multi-scale decays ``γ_h = 1 − 2^(−5−h)``, h = 0..heads−1."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))


@register_mechanism(
    "retention",
    family="recurrent",
    receptive_field="causal",
    paper="ViR: Vision Retention Networks / Retentive Network: A Successor to Transformer for Large Language Models",
    year=2023,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="torchscale.component.multiscale_retention.MultiScaleRetention (torchscale 0.3.0); fla.ops.retention",
    test_kwargs={"num_heads": 2, "chunk_size": 5},
    test_size=(12,),
)
class MultiScaleRetention(Mechanism):
    """Multi-scale retention (Sun et al., RetNet 2023; Ali et al., ViR 2023): causal decayed linear attention.

    Per head h with decay ``γ_h``: ``o_n = s·Σ_{m≤n} γ_h^(n−m)(q_n·k_m)v_m`` over the row-major token order;
    heads are group-normalised, gated by ``swish(Linear_G(x))`` and projected. ``mode`` picks the quadratic,
    chunkwise or recurrent form (equal results). Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        gammas: Sequence[float] | None = None,
        mode: str = "chunkwise",
        chunk_size: int = 64,
        gate: bool = True,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        mode = check_choice("mode", mode, MODES, renamed={"parallel": "quadratic"})
        check_int("chunk_size", chunk_size)
        if gammas is None:
            gamma = retnet_gammas(self.num_heads).float()
        else:
            gamma = torch.as_tensor(list(gammas), dtype=torch.float32)
            if gamma.numel() != self.num_heads or bool(((gamma < 0) | (gamma > 1)).any()):
                raise ValueError(f"gammas={list(gammas)} must hold num_heads={self.num_heads} decays in [0, 1]")
        self.register_buffer("gammas", gamma, persistent=False)
        self.mode, self.chunk_size = mode, chunk_size
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.group_norm = nn.GroupNorm(self.num_heads, inner)
        self.gate = nn.Linear(dim, inner, bias=qkv_bias) if gate else None
        self.proj = nn.Linear(inner, dim, bias=qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def retain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The retention core in the selected form; ``[B, N, heads, d]`` in and out."""
        if self.mode == "quadratic":
            return retention_parallel(q, k, v, self.gammas)
        if self.mode == "recurrent":
            return retention_recurrent(q, k, v, self.gammas)
        return retention_chunkwise(q, k, v, self.gammas, chunk_size=self.chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        # The decayed state grows with the sequence: retention and its group norm run in (at least) fp32 so half
        # precision stays finite wherever fp32 is; the normalised output returns to x's dtype.
        ct = compute_dtype(x.dtype)
        y = merge_heads(self.retain(q.to(ct), k.to(ct), v.to(ct)))
        norm = self.group_norm
        weight, bias = (None if t is None else t.to(ct) for t in (norm.weight, norm.bias))
        y = F.group_norm(y.flatten(0, 1), norm.num_groups, weight, bias, norm.eps)  # (batch, channels) layout
        y = y.unflatten(0, tokens.shape[:2]).to(x.dtype)
        if self.gate is not None:
            y = F.silu(self.gate(tokens)) * y
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, chunk_size={self.chunk_size}"
