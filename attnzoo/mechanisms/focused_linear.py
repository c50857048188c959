"""FLatten's focused linear attention: a norm-preserving power feature map plus depthwise-conv rank restoration."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Mechanism, check_int, check_positive, flatten_tokens, merge_heads, resolve_heads
from .linear import linear_attention_associative
from .registry import register_mechanism

__all__ = ["FocusedLinearAttention", "focused_feature_map"]


def focused_feature_map(x: torch.Tensor, scale: torch.Tensor, power: float) -> torch.Tensor:
    """FLatten's φ_p: ``y = (ReLU(x) + 1e-6) / softplus(scale)``, then ``y^p`` rescaled to the norm of ``y``.

    Norms run over the last axis (all channels, before the head split, as in the official code).
    """
    y = (F.relu(x) + 1e-6) / F.softplus(scale)
    powered = y**power
    return powered * (y.norm(dim=-1, keepdim=True) / powered.norm(dim=-1, keepdim=True))


@register_mechanism(
    "focused_linear",
    family="linear",
    paper="FLatten Transformer: Vision Transformer using Focused Linear Attention",
    year=2023,
    native_rank=2,
    complexity="linear",
    reference="LeapLabTHU/FLatten-Transformer models/flatten_pvt.py / flatten_swin.py FocusedLinearAttention",
    note=(
        "As the official FocusedLinearAttention: φ_p with ReLU + 1e-6, a learnable per-channel softplus scale and "
        "focusing factor 3, norms over all channels before the head split; o = φ(q)(Σφ(k)vᵀ) / (φ(q)·Σφ(k) + 1e-6); "
        "plus a 5×5 depthwise conv of v shared by the heads (head_dim channels). The official learned absolute "
        "positional encoding added to k needs a fixed token count and is left out."
    ),
    test_kwargs={"num_heads": 2},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class FocusedLinearAttention(Mechanism):
    """Focused linear attention (Han et al., "FLatten Transformer", ICCV 2023).

    ``φ_p`` sharpens the feature distribution (power ``p`` with the norm kept) so linear attention focuses like
    softmax; a depthwise convolution on ``v`` restores the rank of the ``N×N`` attention matrix.

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``).
        focusing_factor: the power p of φ_p.
        kernel_size: depthwise convolution on v.
        qkv_bias: bias of the qkv projection.
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_positive("focusing_factor", focusing_factor)
        self.focusing_factor = float(focusing_factor)
        check_int("kernel_size", kernel_size, odd=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``φ(q), φ(k), v`` as ``[B, N, heads, head_dim]``."""
        qkv = self.qkv(flatten_tokens(x))
        qk = qkv[..., : 2 * self.dim].unflatten(-1, (2, self.dim))  # φ maps q and k in one pass
        q, k = focused_feature_map(qk, self.scale, self.focusing_factor).unbind(-2)
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, qkv[..., 2 * self.dim :]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = self.features(x)
        out = merge_heads(linear_attention_associative(q, k, v, eps=1e-6)).reshape(x.shape)
        # The head_dim-channel depthwise conv shared by the heads, as one conv over all dim channels (its weights
        # repeated per head) on the channels-last map of v: no per-head reshuffle of v or of the result.
        v_map = v.reshape(x.shape).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        weight, bias = self.dwc.weight.repeat(self.num_heads, 1, 1, 1), self.dwc.bias.repeat(self.num_heads)
        local = F.conv2d(v_map, weight, bias, padding=self.dwc.padding, groups=self.dim).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out + local))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}"
