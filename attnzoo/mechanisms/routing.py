"""Routing Transformer: online k-means routes queries and keys into clusters; attention runs inside each cluster."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_int, flatten_tokens, resolve_heads
from .registry import register_mechanism

__all__ = ["RoutingAttention", "balanced_routing_attention"]


def balanced_routing_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention inside balanced clusters. q, k, v ``[B, heads, N, d]``, centroids ``[heads, n_c, d]``.

    Cluster c takes the ``w = ⌈N/n_c⌉`` queries and the ``w`` keys whose ℓ2-normalised vectors score highest
    against ``μ_c``; queries picked by several clusters average their outputs, unpicked queries get 0.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    width = min(n, math.ceil(n / centroids.shape[1]))
    mu = centroids.to(q.dtype)

    def members(x: torch.Tensor) -> torch.Tensor:  # [B, h, n_c, w] token indices of each cluster
        affinity = torch.einsum("bhnd,hcd->bhcn", F.normalize(x, dim=-1), mu)
        return torch.topk(affinity.detach(), width, dim=-1).indices

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [B, h, n_c, w, d]
        flat = torch.gather(x, 2, rearrange(index, "b h c w -> b h (c w) 1").expand(-1, -1, -1, x.shape[-1]))
        return rearrange(flat, "b h (c w) e -> b (h c) w e", w=width)

    q_index, k_index = members(q), members(k)
    # one engine call over every cluster: [B, (h c), w, d] read as w tokens of h·n_c heads
    cq, ck, cv = (take(x, index).transpose(1, 2) for x, index in ((q, q_index), (k, k_index), (v, k_index)))
    out = attention(cq, ck, cv, scale=scale).transpose(1, 2)
    flat_index = rearrange(q_index, "b h c w -> b h (c w)")
    out = rearrange(out, "b (h c) w e -> b h (c w) e", h=h)
    total = v.new_zeros(b, h, n, v.shape[-1]).scatter_add(2, flat_index[..., None].expand_as(out), out)
    count = v.new_zeros(b, h, n).scatter_add(2, flat_index, torch.ones_like(flat_index, dtype=v.dtype))
    return total / count.clamp_min(1.0)[..., None]


@register_mechanism(
    "routing",
    family="content-routed",
    receptive_field="local",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    year=2020,
    layout="sequence",
    native_rank=1,
    complexity="N·k",
    reference="routing_transformer.KmeansAttention (routing-transformer 1.6.1; fixed kmeans.means, eval, num_mem_kv=0)",
    test_kwargs={"num_heads": 2, "num_clusters": 3},
    test_size=(12,),
)
class RoutingAttention(Mechanism):
    """Routing attention (Roy et al., Routing Transformer 2020): online k-means clustering, attention per cluster.

    Per head, ℓ2-normalised queries and keys are routed to ``num_clusters`` centroids (buffers) with balanced
    clusters of ``⌈N/num_clusters⌉`` queries and keys each; ``SM(s·q·kᵀ)v`` runs inside every cluster. In training
    the centroids follow an EMA (``ema_decay``) of their assigned vectors and ``aux_loss()`` returns the commitment loss
    ``commitment · mean ‖x̂ − μ_c(x)‖²`` of the latest training forward; eval leaves the centroids untouched.
    Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major).
    """

    spatial_ranks = (1, 2, 3)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        num_clusters: int = 56,
        ema_decay: float = 0.999,
        commitment: float = 1e-4,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_int("num_clusters", num_clusters)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} must be in [0, 1]")
        if commitment < 0:
            raise ValueError(f"commitment={commitment!r} must be non-negative")
        self.num_clusters, self.ema_decay, self.commitment = num_clusters, float(ema_decay), float(commitment)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("centroids", F.normalize(torch.randn(self.num_heads, num_clusters, self.head_dim), dim=-1))

    @torch.no_grad()
    def update_centroids(self, unit: torch.Tensor, assignment: torch.Tensor) -> None:
        """EMA step ``μ_c ← λμ_c + (1−λ)·mean of the vectors assigned to c`` (clusters with no vector keep μ_c)."""
        one_hot = F.one_hot(assignment, self.num_clusters).to(unit.dtype)  # [B, h, M, n_c]
        sums = torch.einsum("bhmc,bhmd->hcd", one_hot, unit)
        counts = one_hot.sum((0, 2))[..., None]
        mean = sums / counts.clamp_min(1.0)
        moved = self.ema_decay * self.centroids + (1 - self.ema_decay) * mean.to(self.centroids.dtype)
        self.centroids.copy_(torch.where(counts > 0, moved, self.centroids))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = balanced_routing_attention(q, k, v, self.centroids)
        if self.training:  # commitment loss against the centroids used above, then their EMA step
            unit = F.normalize(torch.cat([q, k], dim=2), dim=-1)
            mu = self.centroids.to(unit.dtype)
            assignment = torch.einsum("bhmd,hcd->bhmc", unit.detach(), mu).argmax(-1)
            nearest = mu[torch.arange(self.num_heads, device=x.device)[:, None], assignment]  # [B, h, M, d]
            self.record_aux_loss(self.commitment * (unit - nearest).pow(2).sum(-1).mean())
            self.update_centroids(unit.detach(), assignment)
        else:
            self.record_aux_loss(None)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(out)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}"
