"""ViG: bidirectional gated linear attention (GLA) with a 2-D locality gate.

Scan forms take ``q, k`` ``[B, N, heads, d_k]``, ``v`` ``[B, N, heads, d_v]`` and a log forget gate ``log_decay``
``[B, N, heads, d_k]`` (≤ 0) and return ``[B, N, heads, d_v]`` (fp16/bf16 computed in fp32):

- ``gla_recurrent``: ``S_t = diag(exp(α_t))·S_{t−1} + k_tᵀv_t``, ``o_t = s·q_t S_t`` (the definition).
- ``gla_chunked``: chunks of ``chunk_size`` tokens; inside a chunk the pairwise decay ``exp(b_t − b_s)`` (b = the
  within-chunk cumulative log gate) is formed only for ``s ≤ t``, so every exponent is ≤ 0 and nothing overflows;
  one state per chunk carries the past.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_choice, check_int, merge_heads, resolve_heads
from .registry import register_mechanism

__all__ = ["gla_recurrent", "gla_chunked", "GatedLinearAttention2D"]

MODES = ("chunkwise", "recurrent")


def _prepare(q, k, v, log_decay, scale):
    if q.dim() != 4 or k.shape != q.shape or log_decay.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, log_decay must be [batch, tokens, heads, d_k] and v [batch, tokens, heads, d_v], got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, log_decay.shape={tuple(log_decay.shape)}, "
            f"v.shape={tuple(v.shape)}"
        )
    ct = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q.to(ct) * scale, k.to(ct), v.to(ct), log_decay.to(ct)


def gla_recurrent(q, k, v, log_decay, scale: float | None = None) -> torch.Tensor:
    """Reference: one token at a time, ``S_t = diag(exp(α_t))S_{t−1} + k_tᵀv_t``, ``o_t = s·q_t S_t``."""
    dtype = q.dtype
    q, k, v, log_decay = _prepare(q, k, v, log_decay, scale)
    b, n, h, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    outputs = []
    for t in range(n):
        state = log_decay[:, t].exp().unsqueeze(-1) * state + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))
    return torch.stack(outputs, dim=1).to(dtype)


def gla_chunked(q, k, v, log_decay, scale: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """Chunked form: exact for any ``chunk_size`` (the last chunk may be shorter)."""
    check_int("chunk_size", chunk_size)
    dtype = q.dtype
    q, k, v, log_decay = _prepare(q, k, v, log_decay, scale)
    b, n, h, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    outputs = []
    for start in range(0, n, chunk_size):
        qc, kc, vc, gc = (t[:, start : start + chunk_size] for t in (q, k, v, log_decay))
        cum = gc.cumsum(1)  # b_t = Σ_{u ≤ t} α_u inside the chunk
        length = qc.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()[None, :, :, None, None]
        gap = torch.where(causal, cum[:, :, None] - cum[:, None, :], float("-inf"))  # [b, t, s, h, d]
        scores = torch.einsum("bthd,bshd,btshd->bhts", qc, kc, gap.exp())
        intra = torch.einsum("bhts,bshe->bthe", scores, vc)
        inter = torch.einsum("bthd,bhde->bthe", qc * cum.exp(), state)
        last = cum[:, -1]  # [b, h, d]
        state = last.exp().unsqueeze(-1) * state + torch.einsum("bshd,bshe->bhde", kc * (last[:, None] - cum).exp(), vc)
        outputs.append(intra + inter)
    return torch.cat(outputs, dim=1).to(dtype)


@register_mechanism(
    "gated_linear_2d",
    family="recurrent",
    paper="ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="hustvl/ViG classification/models/vig.py::GatedLinearAttention (official); fla.ops.gla (scan)",
    test_kwargs={"num_heads": 2, "chunk_size": 5},
    test_size=(4, 5),
)
class GatedLinearAttention2D(Mechanism):
    """ViG gated linear attention (Liao et al., 2024): bidirectional GLA scans with a 2-D locality gate.

    ``x_l = SiLU(DWConv3×3(x))``; q, k (width ``expand_k·C``), v (width C) and per-channel forget gates
    ``α = logsigmoid(g)/gate_logit_normalizer`` (low-rank) from ``x_l``. A forward row-major scan and a backward
    scan (own gates, both include the current token) are averaged; the locality gate
    ``G = σ(Linear(x_l))`` mixes ``RMSNorm(o)·G + RMSNorm(x_l)·(1 − G)`` (per-head RMSNorm), then a Linear.
    ``mode`` picks the chunkwise or recurrent scan (equal results). Input ``(B, H, W, C)``.
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        proj_drop: float = 0.0,
        expand_k: float = 0.5,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        mode: str = "chunkwise",
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim)
        self.num_heads, _ = resolve_heads(dim, num_heads, None)
        key_dim = int(dim * expand_k)
        if key_dim < 1 or key_dim % self.num_heads:
            raise ValueError(
                f"expand_k={expand_k} gives key width {key_dim}, which must be divisible by num_heads={self.num_heads}"
            )
        mode = check_choice("mode", mode, MODES, renamed={"chunked": "chunkwise"})
        check_int("chunk_size", chunk_size)
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer={gate_logit_normalizer!r} must be positive")
        self.key_dim, self.mode, self.chunk_size = key_dim, mode, chunk_size
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.qkv = nn.Linear(dim, 2 * key_dim + dim, bias=False)
        self.forget = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, 2 * key_dim)
        )
        self.locality_gate = nn.Linear(dim, dim)
        self.norm_attn = nn.RMSNorm(dim // self.num_heads, eps=1e-5)
        self.norm_local = nn.RMSNorm(dim // self.num_heads, eps=1e-5)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def scan(self, q, k, v, log_decay) -> torch.Tensor:
        if self.mode == "recurrent":
            return gla_recurrent(q, k, v, log_decay)
        return gla_chunked(q, k, v, log_decay, chunk_size=self.chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.num_heads
        x_local = F.silu(self.local(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        tokens = rearrange(x_local, "b y x c -> b (y x) c")
        q, k, v = self.qkv(tokens).split([self.key_dim, self.key_dim, self.dim], dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b n h d", h=h) for t in (q, k, v))
        log_fwd, log_bwd = (
            rearrange(F.logsigmoid(g) / self.gate_logit_normalizer, "b n (h d) -> b n h d", h=h)
            for g in self.forget(tokens).chunk(2, dim=-1)
        )
        forward_scan = self.scan(q, k, v, log_fwd)
        backward_scan = self.scan(q.flip(1), k.flip(1), v.flip(1), log_bwd.flip(1)).flip(1)
        attn = self.norm_attn((forward_scan + backward_scan) / 2)
        local = self.norm_local(rearrange(tokens, "b n (h d) -> b n h d", h=h))
        gate = torch.sigmoid(self.locality_gate(tokens))
        y = merge_heads(attn) * gate + merge_heads(local) * (1 - gate)
        out = self.proj_drop(self.proj(y))
        return rearrange(out, "b (y x) c -> b y x c", y=x.shape[1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, key_dim={self.key_dim}, mode={self.mode!r}"
