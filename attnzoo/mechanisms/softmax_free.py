"""SOFT: softmax-free attention with a Gaussian kernel, Nyström landmarks and a Newton–Raphson pseudo-inverse.

Functional pieces (layout ``[..., tokens, d]``, fp16/bf16 computed in fp32):

- ``gaussian_kernel(a, b)``: ``exp(−‖a_i − b_j‖²/2)``.
- ``newton_inverse(p, iters)``: Newton–Raphson (Newton–Schulz) iteration ``V ← 2V − VPV`` for the (pseudo-)inverse of
  symmetric positive semi-definite ``p``, run without autograd; its gradient is that of the exact inverse,
  ``dP = −Vᵀ·G·Vᵀ`` (the paper's backward), obtained through a first-order correction term.
- ``softmax_free_attention(q, landmarks, v)``: ``O = k(Q, Q̃)·NR(k(Q̃, Q̃))·(k(Q, Q̃)ᵀV)``, linear in N.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import compute_dtype
from ._base import Mechanism, check_int, renamed_kwargs, resolve_heads
from .registry import register_mechanism

__all__ = ["gaussian_kernel", "newton_inverse", "softmax_free_attention", "SoftmaxFreeAttention"]


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``exp(−‖a_i − b_j‖²/2)`` for ``a [..., N, d]``, ``b [..., M, d]`` → ``[..., N, M]``."""
    squared = a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)
    return torch.exp(-0.5 * squared.clamp_min(0))


def newton_inverse(p: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Pseudo-inverse of symmetric PSD ``p [..., m, m]`` by ``iters`` Newton–Raphson steps ``V ← 2V − VPV``.

    Start ``V₀ = p / (‖p‖₁‖p‖∞)`` (convergent for any PSD ``p``; the paper's ``2/‖p‖₁²`` stalls when
    ``p`` has equal row sums, e.g. ``p = I``). Forward without autograd; backward of the exact inverse.
    """
    with torch.no_grad():
        norm_1 = p.abs().sum(-2).amax(-1)
        norm_inf = p.abs().sum(-1).amax(-1)
        inverse = p.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
        for _ in range(iters):
            inverse = 2 * inverse - inverse @ p @ inverse
    if not p.requires_grad:
        return inverse
    return inverse - inverse @ (p - p.detach()) @ inverse  # value V, gradient −Vᵀ·G·Vᵀ


def softmax_free_attention(q: torch.Tensor, landmarks: torch.Tensor, v: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """``O = K₁·NR(K₂)·(K₁ᵀV)``, ``K₁ = k(Q, Q̃)`` ``[N, m]``, ``K₂ = k(Q̃, Q̃)`` ``[m, m]`` (Q shared with K)."""
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, landmarks, v = q.to(ct), landmarks.to(ct), v.to(ct)
    k1 = gaussian_kernel(q, landmarks)
    k2 = gaussian_kernel(landmarks, landmarks)
    return (k1 @ (newton_inverse(k2, iters) @ (k1.transpose(-1, -2) @ v))).to(dtype)


@register_mechanism(
    "softmax_free",
    family="linear",
    paper="Softmax-free Linear Transformers (SOFT: Softmax-free Transformer with Linear Complexity)",
    year=2022,
    native_rank=2,
    complexity="linear",
    reference="fudan-zvg/SOFT models/softmax_free_transformer.py (official, kernel_method='torch')",
    test_kwargs={"num_heads": 2, "sr_ratio": 2, "kernel_size": 3},
    test_size=(6, 6),
    size_args={"sr_ratio": "ratio", "kernel_size": "kernel"},
)
class SoftmaxFreeAttention(Mechanism):
    """Softmax-free attention (Lu et al., SOFT, NeurIPS 2021 / IJCV 2024): Gaussian-kernel self-attention through Nyström landmarks.

    ``Q = Linear(x)·d^-1/4`` is both query and key (landmarks and the kernels in fp32 for fp16/bf16 inputs); landmarks ``Q̃ = GELU(LN(Conv_{r×r, stride r}(Q)))`` per head
    (``r = sr_ratio``; 49 landmarks on a 56×56 map with r = 8); ``O = k(Q,Q̃)·NR(k(Q̃,Q̃))·(k(Q,Q̃)ᵀV)`` with
    ``k(a, b) = exp(−‖a−b‖²/2)`` and ``newton_iters`` Newton–Raphson steps; a depthwise ``kernel_size`` convolution
    of V (heads as channels, shared across head_dim) is added, then a Linear. Input ``(B, H, W, C)``, H, W ≥ sr_ratio.
    """

    spatial_ranks = (2,)

    @renamed_kwargs(ratio="sr_ratio", conv_size="kernel_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        sr_ratio: int = 8,
        kernel_size: int = 9,
        newton_iters: int = 20,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_int("kernel_size", kernel_size, odd=True)
        self.sr_ratio, self.newton_iters = check_int("sr_ratio", sr_ratio), check_int("newton_iters", newton_iters)
        inner, d = self.num_heads * self.head_dim, self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.landmark = nn.Conv2d(d, d, sr_ratio, stride=sr_ratio, bias=False)
        self.landmark_norm = nn.LayerNorm(d)
        self.dwc = nn.Conv2d(
            self.num_heads, self.num_heads, kernel_size, padding=kernel_size // 2, groups=self.num_heads, bias=False
        )
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        if rows < self.sr_ratio or cols < self.sr_ratio:
            raise ValueError(
                f"sr_ratio={self.sr_ratio} needs an input of at least {self.sr_ratio}×{self.sr_ratio}, got {rows}×{cols}"
            )
        b, h = x.shape[0], self.num_heads
        ct = compute_dtype(x.dtype)  # the landmarks feed an ill-conditioned inverse: fp32 for fp16/bf16 inputs
        q = rearrange(self.q(x), "b y x (h d) -> (b h) d y x", h=h).to(ct) * self.head_dim**-0.25
        v = rearrange(self.v(x), "b y x (h d) -> b h (y x) d", h=h)
        pooled = F.conv2d(q, self.landmark.weight.to(ct), stride=self.sr_ratio)
        norm = self.landmark_norm
        landmarks = F.gelu(
            F.layer_norm(
                rearrange(pooled, "bh d p r -> bh (p r) d"),
                norm.normalized_shape,
                norm.weight.to(ct),
                norm.bias.to(ct),
                norm.eps,
            )
        )
        q_tokens = rearrange(q, "(b h) d y x -> b h (y x) d", b=b)
        landmarks = rearrange(landmarks, "(b h) m d -> b h m d", b=b)
        out = softmax_free_attention(q_tokens, landmarks, v.to(ct), self.newton_iters).to(x.dtype)
        local = rearrange(
            self.dwc(rearrange(v, "b h (y x) d -> (b d) h y x", y=rows)), "(b d) h y x -> b h (y x) d", b=b
        )
        out = rearrange(out + local, "b h (y x) d -> b y x (h d)", y=rows)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, newton_iters={self.newton_iters}"
