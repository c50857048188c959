"""Sparsifiner: a low-rank connectivity predictor picks the top-k keys of every query; MHSA runs on those only."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import attention
from ._base import (
    Mechanism,
    check_int,
    check_probability,
    check_resolution,
    flatten_tokens,
    merge_heads,
    renamed_kwargs,
    resolve_heads,
    split_qkv,
)
from .registry import register_mechanism

__all__ = ["LearnedSparseAttention"]


@register_mechanism(
    "learned_sparse",
    family="content-routed",
    paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
    year=2023,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="lim142857/Sparsifiner src/models/sparsifiner.py::MaskPredictor, Attention (official; read)",
    needs_input_size=True,
    receptive_field="local",
    note=(
        "Implemented from the official MaskPredictor: per head, q and k are reduced to head_dim/reduction channels, "
        "k is projected from N to N/reduce_n basis tokens, the basis coefficients softmax(s·q_c·k_basisᵀ) times a "
        "learned basis (N/reduce_n × N) give the approximate attention, and each query keeps its top-k keys "
        "(topk, default ceil(keep_rate·N)). No gradient flows through the top-k mask (it is detached, as in the "
        "official code): the predictor learns only from aux_loss(), recorded in training to the mean squared error between "
        "the approximate attention and the detached dense attention (the attention reconstruction loss). Not "
        "implemented: the basis thresholds and the token pruning of the official code. Without a CLS token every "
        "query row is sparse, so a query sees the top-k keys the predictor routes it to (receptive-field class "
        "'local', as routed attention). The token count is fixed by input_resolution (the N→N/reduce_n projection)."
    ),
    test_kwargs={"num_heads": 2, "input_resolution": (6, 6)},
    test_size=(6, 6),
)
class LearnedSparseAttention(Mechanism):
    """Sparsifiner (Wei et al., 2023): MHSA restricted to the top-k keys a low-rank predictor picks per query.

    Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major) with ``N = prod(input_resolution)``.

    Args:
        dim: channels in and out.
        num_heads: attention heads (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of the qkv projection (official False).
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        input_resolution: the token grid (or ``(N,)``), which fixes the predictor's token projection.
        keep_rate: fraction of keys kept per query when ``topk`` is not given (official 0.25).
        topk: keys kept per query (``N`` gives dense MHSA).
        reduce_n: token reduction factor of the predictor (official 8).
        reduction: channel reduction factor of the predictor (official 2).
    """

    spatial_ranks = (1, 2, 3)

    @renamed_kwargs(reduce_c="reduction")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        input_resolution: int | tuple[int, ...] = (14, 14),
        keep_rate: float = 0.25,
        topk: int | None = None,
        reduce_n: int = 8,
        reduction: int = 2,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.input_resolution = check_resolution("input_resolution", input_resolution, rank=None)
        self.num_tokens = math.prod(self.input_resolution)
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate={keep_rate!r} must be a number in (0, 1]")
        self.topk = math.ceil(keep_rate * self.num_tokens) if topk is None else check_int("topk", topk)
        if self.topk > self.num_tokens:
            raise ValueError(f"topk={topk} must be at most the number of tokens {self.num_tokens} (input_resolution)")
        check_int("reduce_n", reduce_n)
        check_int("reduction", reduction)
        basis = max(1, self.num_tokens // reduce_n)
        reduced = max(1, self.head_dim // reduction)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        self.predict_q = nn.Linear(self.head_dim, reduced)
        self.predict_k = nn.Linear(self.head_dim, reduced)
        self.token_basis = nn.Parameter(torch.empty(self.num_tokens, basis))
        self.basis_back = nn.Parameter(torch.empty(self.num_tokens, basis))
        nn.init.trunc_normal_(self.token_basis, std=0.02)
        nn.init.trunc_normal_(self.basis_back, std=0.02)
        self.predictor_scale = self.num_heads**-0.5  # as the official MaskPredictor (num_heads, not head_dim)

    def approximate_attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The predictor's low-rank attention ``[B, heads, N, N]`` from q, k ``[B, N, heads, head_dim]``."""
        q_c = self.predict_q(q).transpose(1, 2)  # [B, h, N, c]
        k_basis = torch.einsum("bnhc,nk->bhkc", self.predict_k(k), self.token_basis)  # [B, h, K, c]
        coefficients = torch.softmax(self.predictor_scale * q_c @ k_basis.transpose(-1, -2), dim=-1)
        return coefficients @ self.basis_back.transpose(0, 1)

    def connectivity(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boolean top-k mask ``[B, heads, N, N]``, detached, no gradient; the approximate attention)."""
        approx = self.approximate_attention(q, k)
        keep = approx.detach().topk(self.topk, dim=-1).indices
        mask = torch.zeros_like(approx, dtype=torch.bool).scatter(-1, keep, True)
        return mask, approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"x.shape={tuple(x.shape)} has {tokens.shape[1]} tokens; this module was built for "
                f"input_resolution={self.input_resolution} ({self.num_tokens} tokens)"
            )
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        mask, approx = self.connectivity(q, k)
        out = attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        if self.training:
            with torch.no_grad():
                dense = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * self.head_dim**-0.5, dim=-1)
            self.record_aux_loss(F.mse_loss(approx, dense))
        else:
            self.record_aux_loss(None)
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, input_resolution={self.input_resolution}, topk={self.topk}"
