"""Lightning attention (TransNormerLLM): decayed linear attention without softmax, normaliser or d^-1/2.

``o_t = Σ_{s≤t} λ^(t−s)(q_t·k_s)v_s`` per head, ``λ = exp(−r_h)`` with ALiBi slopes ``r_h``. This is retention
(``retention.py``) with scale 1, so its naive and recurrent forms are retention's; ``lightning_tiled`` is the paper's
IO-friendly algorithm: a loop over blocks that keeps one running ``KV`` state, masked decayed attention inside the
block and ``ΛQ_i·KV`` across blocks. Layout ``[B, N, heads, d]``; fp16/bf16 are computed in fp32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_choice, check_int, flatten_tokens, merge_heads, renamed_kwargs, resolve_heads
from .registry import register_mechanism
from .retention import _prepare, retention_parallel, retention_recurrent

__all__ = ["lightning_naive", "lightning_recurrent", "lightning_tiled", "alibi_slopes", "LightningAttention"]

MODES = ("chunkwise", "quadratic", "recurrent")


def lightning_naive(q, k, v, decay) -> torch.Tensor:
    """Reference form: ``O = (QKᵀ ⊙ M)V``, ``M[t, s] = λ^(t−s)·[t ≥ s]``."""
    return retention_parallel(q, k, v, decay, scale=1.0)


def lightning_recurrent(q, k, v, decay) -> torch.Tensor:
    """Recurrent form: ``S_t = λ·S_{t−1} + k_tᵀv_t``, ``o_t = q_t S_t``."""
    return retention_recurrent(q, k, v, decay, scale=1.0)


def _block_tables(log_decay: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
    """Decay tables of a block of ``length`` tokens: ``M`` [h, b, b], ``Λ``, ``λ^b Λ^{−1}`` [h, b] and ``λ^b`` [h]."""
    pos = torch.arange(length, device=log_decay.device, dtype=log_decay.dtype)
    gap = pos[:, None] - pos[None, :]
    mask = torch.where(gap >= 0, torch.exp(log_decay[:, None, None] * gap.clamp_min(0)), 0.0)
    mask = torch.where(gap == 0, 1.0, mask)  # λ⁰ = 1 also for λ = 0
    into = torch.exp(log_decay[:, None] * (pos + 1))
    out_of = torch.exp(log_decay[:, None] * (length - 1 - pos))
    out_of = torch.where(pos == length - 1, 1.0, out_of)
    return mask, into, out_of, torch.exp(log_decay * length)


def lightning_tiled(q, k, v, decay, chunk_size: int = 64) -> torch.Tensor:
    """Tiled form (Lightning Attention, Algorithm 1): per block i of length b,
    intra ``[(Q_iK_iᵀ) ⊙ M]V_i``, inter ``ΛQ_i·KV`` with ``Λ = diag(λ¹..λ^b)``, then
    ``KV ← λ^b·KV + (λ^b Λ^{−1} K_i)ᵀ V_i``. The last block may be shorter; no padding."""
    check_int("chunk_size", chunk_size)
    dtype = q.dtype
    q, k, v, decay, _ = _prepare(q, k, v, decay, scale=1.0)
    log_decay = decay.log()  # [h]; λ = 0 gives -inf
    b, n, h, _ = q.shape
    # the tables depend only on the block length: one set for full blocks, one for a shorter last block
    lengths = {min(chunk_size, n - start) for start in range(0, n, chunk_size)}
    tables = {length: _block_tables(log_decay, length) for length in lengths}
    kv = q.new_zeros(b, h, q.shape[-1], v.shape[-1])
    outputs = []
    for start in range(0, n, chunk_size):
        qi, ki, vi = (t[:, start : start + chunk_size] for t in (q, k, v))
        mask, into, out_of, carry = tables[qi.shape[1]]
        intra = torch.einsum("bthd,bshd,hts,bshe->bthe", qi, ki, mask, vi)
        inter = torch.einsum("bthd,ht,bhde->bthe", qi, into, kv)
        kv = carry[:, None, None] * kv + torch.einsum("bshd,hs,bshe->bhde", ki, out_of, vi)
        outputs.append(intra + inter)
    return torch.cat(outputs, dim=1).to(dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes: ``2^(−8(i+1)/H)`` for power-of-two H, else the first H/… slopes interleaved as in ALiBi."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return torch.tensor(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


@register_mechanism(
    "lightning",
    family="recurrent",
    receptive_field="causal",
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    year=2024,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="lightning-attn 0.0.5 lightning_attn_func (Triton, GPU); fla.ops.simple_gla",
    test_kwargs={"num_heads": 2, "chunk_size": 5},
    test_size=(12,),
)
class LightningAttention(Mechanism):
    """Lightning attention (Qin et al., TransNormerLLM 2024): tiled decayed linear attention, no softmax.

    Per head ``o_t = Σ_{s≤t} λ_h^(t−s)(q_t·k_s)v_s`` with ``q, k = SiLU(Linear(x))``, ``λ_h = exp(−r_h)`` from ALiBi
    slopes (scaled by ``1 − l/(L−1) + 1e−5`` for layer ``layer_index = l`` of ``num_layers = L``), output
    ``Linear(RMSNorm(O) ⊙ u)`` with gate ``u = Linear(x)``. ``is_causal=False`` (library extension for images)
    uses ``λ^|t−s|``: a forward and a reversed scan, the diagonal counted once. ``mode`` picks the form.
    Input ``(B, N, C)`` or ``(B, *spatial, C)`` (flattened row-major).
    """

    spatial_ranks = (1, 2, 3)

    @renamed_kwargs(block_size="chunk_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        slopes: str | Sequence[float] = "alibi",
        chunk_size: int = 64,
        is_causal: bool = True,
        mode: str = "chunkwise",
        layer_index: int = 0,
        num_layers: int = 1,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        mode = check_choice("mode", mode, MODES, renamed={"tiled": "chunkwise", "naive": "quadratic"})
        check_int("chunk_size", chunk_size)
        if (
            not isinstance(num_layers, int)
            or num_layers < 1
            or not isinstance(layer_index, int)
            or not 0 <= layer_index < num_layers
        ):
            raise ValueError(f"layer_index={layer_index!r} must be in [0, num_layers={num_layers!r})")
        if isinstance(slopes, str):
            if slopes != "alibi":
                raise ValueError(f"slopes={slopes!r} must be 'alibi' or a sequence of num_heads non-negative rates")
            rates = alibi_slopes(self.num_heads)
        else:
            rates = torch.as_tensor(list(slopes), dtype=torch.float32)
            if rates.numel() != self.num_heads or bool((rates < 0).any()):
                raise ValueError(f"slopes={list(slopes)} must hold num_heads={self.num_heads} non-negative rates")
        if num_layers > 1:
            rates = rates * (1 - layer_index / (num_layers - 1) + 1e-5)
        self.register_buffer("decay", torch.exp(-rates.float()), persistent=False)
        self.mode, self.chunk_size, self.is_causal = mode, chunk_size, is_causal
        inner = self.num_heads * self.head_dim
        self.qkvu = nn.Linear(dim, 4 * inner, bias=qkv_bias)
        self.norm = nn.RMSNorm(inner, elementwise_affine=False)
        self.proj = nn.Linear(inner, dim, bias=qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def scan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The causal lightning core in the selected form; ``[B, N, heads, d]`` in and out."""
        if self.mode == "quadratic":
            return lightning_naive(q, k, v, self.decay)
        if self.mode == "recurrent":
            return lightning_recurrent(q, k, v, self.decay)
        return lightning_tiled(q, k, v, self.decay, self.chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens = flatten_tokens(x)
        q, k, v, u = rearrange(self.qkvu(tokens), "b n (four h d) -> four b n h d", four=4, h=self.num_heads)
        # The decayed sums grow with the sequence: keep them and their normalisation in (at least) fp32 so half
        # precision stays finite wherever fp32 is; only the normalised output returns to x's dtype.
        ct = compute_dtype(x.dtype)
        q, k, v = F.silu(q).to(ct), F.silu(k).to(ct), v.to(ct)
        o = self.scan(q, k, v)
        if not self.is_causal:
            back = self.scan(q.flip(1), k.flip(1), v.flip(1)).flip(1)
            o = o + back - (q * k).sum(-1, keepdim=True) * v
        y = self.norm(merge_heads(o)).to(x.dtype) * merge_heads(u)
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, chunk_size={self.chunk_size}, "
            f"is_causal={self.is_causal}"
        )
