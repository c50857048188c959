"""MoH: multi-head attention as a mixture of heads, with shared heads and top-k routed heads per token."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, check_probability, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["MixtureOfHeadsAttention"]


@register_mechanism(
    "mixture_of_heads",
    family="head-mixing",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    year=2024,
    layout="sequence",
    native_rank=1,
    complexity="quadratic",
    reference="official SkyworkAI/MoH MoH-DiT/models.py::MoHAttention "
    "(keys wg, wg_0, wg_1 = routed_gate, branch_gate, shared_gate)",
    test_kwargs={"num_heads": 4, "shared_heads": 1, "routed_topk": 2},
    test_size=(12,),
)
class MixtureOfHeadsAttention(Mechanism):
    """Mixture-of-head attention (Jin et al., MoH, 2024): MHSA whose head outputs are gated per token.

    Heads ``0..shared_heads-1`` are always active, weighted by ``g_s = h_s·softmax(W_s x)``; of the other
    ``E = num_heads - shared_heads`` heads each token keeps the ``routed_topk`` most probable under
    ``softmax(W_r x)``, renormalised over the kept ones and scaled by ``k``; the two groups are balanced by
    ``2·softmax(W_0 x)``. ``y = proj(concat_i G_i·O_i)``. After a training-mode forward ``aux_loss()`` returns
    the load-balancing loss ``aux_loss_weight · E · Σ_i P_i f_i`` (P: mean routing probability, f: selection rate of
    routed head i), to be added to the training loss (``None`` after an eval-mode forward, as in the official code).
    Defaults keep the paper's ratios (25 % shared, 75 % of heads active).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        shared_heads: int = 2,
        routed_topk: int = 4,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        aux_loss_weight: float = 0.01,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        valid_shared = isinstance(shared_heads, int) and not isinstance(shared_heads, bool)
        if not valid_shared or not 0 <= shared_heads <= self.num_heads:
            raise ValueError(f"shared_heads={shared_heads!r} must be an int in [0, num_heads={self.num_heads}]")
        self.shared_heads = shared_heads
        self.routed_heads = self.num_heads - shared_heads
        low = 1 if self.routed_heads else 0
        valid_topk = isinstance(routed_topk, int) and not isinstance(routed_topk, bool)
        if not valid_topk or not low <= routed_topk <= self.routed_heads:
            raise ValueError(
                f"routed_topk={routed_topk!r} must be an int in [{low}, num_heads - shared_heads = {self.routed_heads}]"
            )
        self.routed_topk = routed_topk
        self.aux_loss_weight = float(aux_loss_weight)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        # bias-free routers; a softmax over one entry is constant, so such routers are not built
        self.routed_gate = nn.Linear(dim, self.routed_heads, bias=False) if self.routed_heads else None
        self.shared_gate = nn.Linear(dim, shared_heads, bias=False) if shared_heads > 1 else None
        self.branch_gate = nn.Linear(dim, 2, bias=False) if shared_heads and self.routed_heads else None

    def gates(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token head gates ``[B, N, heads]`` and the (unweighted) load-balancing loss."""
        groups = []
        aux = tokens.new_zeros(())
        if self.shared_heads:
            if self.shared_gate is not None:
                shared = self.shared_heads * self.shared_gate(tokens).softmax(dim=-1)
            else:
                shared = tokens.new_ones(*tokens.shape[:-1], 1)
            groups.append(shared)
        if self.routed_gate is not None:
            probs = self.routed_gate(tokens).softmax(dim=-1)
            chosen = probs.topk(self.routed_topk, dim=-1).indices
            selected = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
            kept = probs * selected
            routed = self.routed_topk * kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
            groups.append(routed)
            mean_prob = probs.flatten(0, -2).mean(dim=0)
            selection_rate = selected.flatten(0, -2).mean(dim=0)
            aux = self.routed_heads * (mean_prob * selection_rate).sum()
        if self.branch_gate is not None:
            balance = 2 * self.branch_gate(tokens).softmax(dim=-1)
            groups = [groups[0] * balance[..., :1], groups[1] * balance[..., 1:]]
        return torch.cat(groups, dim=-1), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        heads = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        gates, aux = self.gates(tokens)
        self.record_aux_loss(self.aux_loss_weight * aux)
        mixed = merge_heads(heads * gates.unsqueeze(-1).to(heads.dtype))
        return self.proj_drop(self.proj(mixed)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, shared_heads={self.shared_heads}, "
            f"routed_topk={self.routed_topk} of {self.routed_heads}"
        )
