"""DCAL global-local cross-attention (GLCA): the tokens with the highest attention rollout query all keys."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import attention
from ._base import (
    BlockState,
    Mechanism,
    check_int,
    check_probability,
    flatten_tokens,
    merge_heads,
    resolve_heads,
    split_qkv,
)
from .registry import register_mechanism

__all__ = ["GlobalLocalCrossAttention"]


def rollout_step(weights: torch.Tensor) -> torch.Tensor:
    """One attention-rollout factor ``0.5·mean_heads(A) + 0.5·I`` ``[B, N, N]`` from weights ``[B, heads, N, N]``."""
    n = weights.shape[-1]
    return 0.5 * weights.mean(dim=1) + 0.5 * torch.eye(n, dtype=weights.dtype, device=weights.device)


@register_mechanism(
    "global_local_cross",
    family="cross",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification (DCAL)",
    year=2022,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="paper (DCAL, Zhu et al., CVPR 2022), Sec. 3.2 GLCA; no official code was found to read",
    receptive_field="global",
    note=(
        "Shape-keeping form of GLCA (our reading): a self-attention branch (its own qkv) gives every token's output "
        "and its attention weights A; the rollout R = Ŝ·R_prev with Ŝ = 0.5·mean_heads(A) + 0.5·I accumulates over "
        "the global_local_cross blocks of a backbone stage (declares uses_block_state; R_prev = I standalone or in "
        "the first block); the importance of a token is the column mean of R (DCAL: the CLS row of the rollout over "
        "all earlier layers; there is no CLS token here); the R = topk (default ceil(keep_rate·N), DCAL R = 10%) most "
        "important tokens query all keys with the GLCA branch's own qkv (not shared with SA, as in DCAL) and their "
        "outputs replace the SA outputs at those positions; one output projection. The rollout is detached and the "
        "top-R selection passes no gradient (integer indices); gradients flow through both branches' values. "
        "topk = N gives mhsa with the GLCA weights."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(12,),
)
class GlobalLocalCrossAttention(Mechanism):
    """Global-local cross-attention (Zhu et al., DCAL, 2022): top-R local queries attend to all global keys.

    The R tokens that receive the most accumulated attention (rollout over the stage's blocks, ``state``; see
    ``BlockState``) query all keys with the GLCA weights; the others keep the self-attention output.
    Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major).

    Args:
        dim: channels in and out.
        num_heads: attention heads (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of both qkv projections.
        attn_drop: attention-weight dropout of the GLCA branch.
        proj_drop: dropout after the output projection.
        keep_rate: fraction of tokens selected as local queries when ``topk`` is not given (DCAL 0.1).
        topk: number R of selected tokens (at most N; N gives mhsa with the GLCA weights).
    """

    spatial_ranks = (1, 2, 3)
    uses_block_state = True

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        keep_rate: float = 0.1,
        topk: int | None = None,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate={keep_rate!r} must be a number in (0, 1]")
        self.keep_rate = float(keep_rate)
        self.topk = None if topk is None else check_int("topk", topk)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.glca_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def num_selected(self, n: int) -> int:
        if self.topk is None:
            return max(1, math.ceil(self.keep_rate * n))
        if self.topk > n:
            raise ValueError(f"topk={self.topk} must be at most the number of tokens N={n}")
        return self.topk

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> torch.Tensor:
        self.check_input(x)
        if state is not None and not isinstance(state, BlockState):
            raise TypeError(f"state must be a BlockState or None, got {type(state).__name__}")
        tokens = flatten_tokens(x)
        n = tokens.shape[1]
        if n == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} has no tokens; global_local_cross selects at least one")
        r = self.num_selected(n)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * self.head_dim**-0.5
        weights = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", weights, v)
        rollout = rollout_step(weights.detach())
        earlier = state.read(self.mechanism_name) if state is not None else []
        if earlier and earlier[-1].shape == rollout.shape:
            rollout = rollout @ earlier[-1]
        if state is not None:
            state.write(self.mechanism_name, rollout)
        selected = rollout.mean(dim=1).topk(r, dim=-1).indices  # [B, R]: most attention received
        gq, gk, gv = split_qkv(self.glca_qkv(tokens), self.num_heads)
        index = selected[:, :, None, None].expand(-1, -1, self.num_heads, self.head_dim)
        local = attention(gq.gather(1, index), gk, gv, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.scatter(1, index, local)
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, keep_rate={self.keep_rate}, topk={self.topk}"
