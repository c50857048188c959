"""Kernelised linear attention (Katharopoulos et al., 2020) with the elu+1 feature map.

Functional forms take positive features ``φ(q), φ(k)`` and ``v`` as ``[B, N, heads, d]`` (fp16/bf16 computed in
fp32) and return ``[B, N, heads, d_v]``:

- ``linear_attention_quadratic``: row-normalised ``φ(Q)φ(K)ᵀ`` (causally masked if asked) times V — the reference.
- ``linear_attention_associative``: ``φ(q_i)ᵀ(Σ_j φ(k_j)v_jᵀ) / (φ(q_i)ᵀΣ_j φ(k_j) + ε)`` (non-causal, O(N·d²)).
- ``linear_attention_recurrent``: the causal RNN ``S_i = S_{i−1} + φ(k_i)v_iᵀ``, ``z_i = z_{i−1} + φ(k_i)``.
- ``linear_attention_chunkwise``: causal, chunked — retention with γ = 1 and scale 1 applied to ``[v, 1]``, whose
  last channel is the normaliser.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_choice, check_int, flatten_tokens, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism
from .retention import retention_chunkwise

__all__ = [
    "elu_feature_map",
    "linear_attention_quadratic",
    "linear_attention_associative",
    "linear_attention_recurrent",
    "linear_attention_chunkwise",
    "LinearAttention",
]

MODES = ("chunkwise", "recurrent", "quadratic")
FEATURE_MAPS = ("elu1p",)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 (positive)."""
    return F.elu(x) + 1


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    ct = compute_dtype(tensors[0].dtype)
    return [t.to(ct) for t in tensors]


def linear_attention_quadratic(q, k, v, *, is_causal: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Reference: ``A = φ(Q)φ(K)ᵀ`` (lower-triangular if causal), ``O = AV / (A·1 + ε)``."""
    dtype = q.dtype
    q, k, v = _upcast(q, k, v)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    if is_causal:
        scores = scores.tril()
    out = torch.einsum("bhij,bjhe->bihe", scores, v) / (rearrange(scores.sum(-1), "b h i -> b i h 1") + eps)
    return out.to(dtype)


def linear_attention_associative(q, k, v, *, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear form: one ``d×d_v`` summary per head, ``O(N·d·d_v)``."""
    dtype = q.dtype
    q, k, v = _upcast(q, k, v)
    kv = torch.einsum("bjhd,bjhe->bhde", k, v)
    normaliser = torch.einsum("bihd,bhd->bih", q, k.sum(1)).unsqueeze(-1) + eps
    return (torch.einsum("bihd,bhde->bihe", q, kv) / normaliser).to(dtype)


def linear_attention_recurrent(q, k, v, *, eps: float = 1e-6) -> torch.Tensor:
    """Causal recurrent form: ``o_i = φ(q_i)ᵀS_i / (φ(q_i)ᵀz_i + ε)``."""
    dtype = q.dtype
    q, k, v = _upcast(q, k, v)
    b, n, h, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    total = q.new_zeros(b, h, d)
    outputs = []
    for i in range(n):
        state = state + torch.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
        total = total + k[:, i]
        numerator = torch.einsum("bhd,bhde->bhe", q[:, i], state)
        outputs.append(numerator / ((q[:, i] * total).sum(-1, keepdim=True) + eps))
    return torch.stack(outputs, dim=1).to(dtype)


def linear_attention_chunkwise(q, k, v, *, eps: float = 1e-6, chunk_size: int = 64) -> torch.Tensor:
    """Causal chunked form: numerator and normaliser in one retention pass (γ = 1, scale 1) over ``[v, 1]``."""
    dtype = q.dtype
    q, k, v = _upcast(q, k, v)
    ones = torch.ones(q.shape[0], q.shape[1], q.shape[2], 1, dtype=q.dtype, device=q.device)
    gamma = torch.ones(q.shape[2], dtype=q.dtype, device=q.device)
    both = retention_chunkwise(q, k, torch.cat([v, ones], dim=-1), gamma, scale=1.0, chunk_size=chunk_size)
    return (both[..., :-1] / (both[..., -1:] + eps)).to(dtype)


@register_mechanism(
    "linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    year=2020,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="fast_transformers.attention.LinearAttention (pytorch-fast-transformers 0.4.0)",
    test_kwargs={"num_heads": 2, "chunk_size": 5},
    test_size=(12,),
)
class LinearAttention(Mechanism):
    """Linear attention (Katharopoulos et al., 2020): softmax replaced by the kernel φ(q)ᵀφ(k), φ = elu + 1.

    ``o_i = φ(q_i)ᵀ(Σ_j φ(k_j)v_jᵀ) / (φ(q_i)ᵀΣ_j φ(k_j) + eps)`` per head, no d^-1/2 scaling; ``is_causal`` sums
    over ``j ≤ i``. ``mode``: ``"chunkwise"`` (associative: one chunk, or chunks of ``chunk_size`` when causal),
    ``"recurrent"`` (causal only) or ``"quadratic"`` (reference). Input ``(B, N, C)`` or ``(B, *spatial, C)``
    (flattened row-major).
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
        is_causal: bool = False,
        eps: float = 1e-6,
        feature_map: str = "elu1p",
        mode: str = "chunkwise",
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        mode = check_choice("mode", mode, MODES, renamed={"parallel": "chunkwise"})
        if mode == "recurrent" and not is_causal:
            raise ValueError(f"mode={mode!r} needs is_causal=True (the recurrent form is causal)")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps={eps!r} must be a non-negative number")
        self.is_causal, self.eps, self.mode = is_causal, float(eps), mode
        self.chunk_size = check_int("chunk_size", chunk_size)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Linear attention of features ``φ(q), φ(k)`` in the selected form; ``[B, N, heads, d]``."""
        if self.mode == "quadratic":
            return linear_attention_quadratic(q, k, v, is_causal=self.is_causal, eps=self.eps)
        if self.mode == "recurrent":
            return linear_attention_recurrent(q, k, v, eps=self.eps)
        if self.is_causal:
            return linear_attention_chunkwise(q, k, v, eps=self.eps, chunk_size=self.chunk_size)
        return linear_attention_associative(q, k, v, eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = split_qkv(self.qkv(flatten_tokens(x)), self.num_heads)
        out = self.attend(elu_feature_map(q), elu_feature_map(k), v)
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, is_causal={self.is_causal}, mode={self.mode!r}"
