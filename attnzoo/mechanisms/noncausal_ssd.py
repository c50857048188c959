"""VSSD's non-causal state space duality (NC-SSD): Mamba2's SSD with the causal mask and decay dropped."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import compute_dtype
from ._base import Mechanism, check_choice, check_int, flatten_tokens, resolve_heads
from ._ssm import inner_width
from .registry import register_mechanism

__all__ = ["NonCausalSSD", "noncausal_ssd_state", "noncausal_ssd_quadratic"]

MODES = ("recurrent", "quadratic")


def noncausal_ssd_state(x, dt, A, B, C, D) -> torch.Tensor:
    """State form: one shared state ``S_h = Σ_j B_jᵀ (Δ_{j,h}·A_h·x_{j,h})``; ``y_i = C_i S_h + D_h x_i``.

    ``x [B, L, heads, p]``, ``dt [B, L, heads]``, ``A, D [heads]``, ``B, C [B, L, N]``. O(L·N·p).
    """
    state = torch.einsum("bln,blhp->bhnp", B, x * (dt * A)[..., None])
    return torch.einsum("bln,bhnp->blhp", C, state) + D[:, None] * x


def noncausal_ssd_quadratic(x, dt, A, B, C, D) -> torch.Tensor:
    """Attention (dual) form: ``y = (C Bᵀ ⊙ (Δ·A)ⱼ) x + D x`` with an L×L score matrix per head. O(L²)."""
    scores = torch.einsum("bin,bjn->bij", C, B)
    return torch.einsum("bij,bjh,bjhp->bihp", scores, dt * A, x) + D[:, None] * x


@register_mechanism(
    "noncausal_ssd",
    family="state-space",
    paper="VSSD: Vision Mamba with Non-Causal State Space Duality",
    year=2024,
    layout="spatial",
    native_rank=2,
    complexity="linear",
    reference="YuHengsss/VSSD classification/models/mamba2.py Mamba2.non_casual_linear_attn (linear_attn_duality=True)",
    is_attention=False,
    note=(
        "As the official non_casual_linear_attn (ngroups=1): y_i = C_i·Σ_j B_jᵀ(Δ_j·A_h·x_j) + D_h·x_i, with "
        "Δ = softplus(dt + dt_bias) and A = −exp(A_log) (the sign is kept, ssd_positve_dA=False). Block as the "
        "official Mamba2: in_proj → (z, x, B, C, dt); 3×3 depthwise conv + SiLU on (x, B, C); LayerNorm(y)·z "
        "(z without activation) → out_proj. Defaults: ssm_ratio (Mamba2's expand) 2, head_dim 64, d_state 64, A_init_range (1, 16)."
    ),
    test_kwargs={"d_state": 8, "head_dim": 16},
    test_size=(5, 6),
    size_args={"kernel_size": "kernel"},
)
class NonCausalSSD(Mechanism):
    """NC-SSD (Shi et al., "VSSD", 2024): every token reads one shared state built from all tokens.

    Mamba2 with scalar ``A_h`` per head; dropping the causal mask and the relative decay of SSD leaves
    ``y_i = C_i Σ_j B_jᵀ(Δ_j A_h x_j) + D_h x_i`` — a linear-attention-like dual of the state-space form.
    ``mode``: ``"recurrent"`` (the shared state, O(L)) or ``"quadratic"`` (the L×L masked-attention form); equal.

    Args:
        dim: channels in/out.
        num_heads: SSD heads (None: ``ssm_ratio·dim // head_dim``).
        head_dim: channels per head (default 64).
        d_state: state size N (the key/query width of the dual form).
        ssm_ratio: inner width ``= ssm_ratio · dim`` (Mamba2's ``expand``).
        kernel_size: depthwise convolution on (x, B, C).
        mode: ``"recurrent"`` or ``"quadratic"``.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        d_state: int = 64,
        ssm_ratio: float = 2.0,
        kernel_size: int = 3,
        mode: str = "recurrent",
        proj_drop: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__(dim)
        inner = inner_width(dim, ssm_ratio)
        if num_heads is None and head_dim is None:
            head_dim = min(64, inner)
        self.num_heads, self.head_dim = resolve_heads(inner, num_heads, head_dim)
        if self.num_heads * self.head_dim != inner:
            raise ValueError(f"num_heads·head_dim={self.num_heads * self.head_dim} must equal ssm_ratio·dim={inner}")
        self.d_state = check_int("d_state", d_state)
        check_int("kernel_size", kernel_size, odd=True)
        self.mode = check_choice("mode", mode, MODES, renamed={"parallel": "quadratic"})
        self.inner = inner
        self.in_proj = nn.Linear(dim, 2 * inner + 2 * d_state + self.num_heads, bias=False)
        conv_channels = inner + 2 * d_state
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.d_state, self.num_heads], dim=-1)
        xbc = F.silu(self.conv(xbc.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        u, B, C = flatten_tokens(xbc).split([self.inner, self.d_state, self.d_state], dim=-1)
        ct = compute_dtype(x.dtype)
        u = u.unflatten(-1, (self.num_heads, self.head_dim)).to(ct)
        dt = F.softplus(flatten_tokens(dt).to(ct) + self.dt_bias.to(ct))
        A = -torch.exp(self.A_log.to(ct))
        form = noncausal_ssd_state if self.mode == "recurrent" else noncausal_ssd_quadratic
        y = form(u, dt, A, B.to(ct), C.to(ct), self.D.to(ct)).flatten(2).to(x.dtype)
        y = self.norm(y).reshape(z.shape) * z
        return self.proj_drop(self.out_proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, d_state={self.d_state}, mode={self.mode!r}"
