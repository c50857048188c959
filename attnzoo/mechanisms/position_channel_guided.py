"""DANet's dual attention: a position attention module and a channel attention module, summed."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, flatten_tokens
from ._channel_conv import reduced_width
from .registry import register_mechanism


@register_mechanism(
    "position_channel_guided",
    family="global",
    paper="Dual Attention Network for Scene Segmentation (DANet)",
    year=2019,
    complexity="quadratic",
    reference="mmsegmentation mmseg/models/decode_heads/da_head.py::PAM, CAM (read); official junfu1115/DANet "
    "encoding/nn/da_att.py::PAM_Module, CAM_Module (read)",
    note="Returns γ_p·PAM(x) + γ_c·CAM(x) without the x each module adds (attnzoo's block adds it). DANet's γ are "
    "learned scalars initialised to 0 (gamma_init=0.0); the default gamma_init=None leaves them out so the "
    "mechanism is not zero at initialisation. The 3×3 conv-BN-ReLU layers around the modules are DANet's head.",
)
class PositionChannelGuided(Mechanism):
    """Dual attention (Fu et al., DANet, CVPR 2019): position attention + channel attention.

    Position attention (PAM): softmax over all positions of (W_q x_i)·(W_k x_j), unscaled, with queries and keys
    of width ``dim // reduction`` and values W_v x (1×1 convs with bias). Channel attention (CAM): the C×C energy
    E = X Xᵀ over positions, turned into inhibition-style weights softmax(max_row(E) − E) that mix the channels of x.

    Args:
        dim: channels.
        reduction: query/key width ratio of PAM (8 in DANet).
        gamma_init: ``None`` (no scale) or the initial value of the learned per-module scale γ (0.0 in DANet).
    """

    def __init__(self, dim: int, *, reduction: int = 8, gamma_init: float | None = None) -> None:
        super().__init__(dim)
        self.reduction = reduction
        width = reduced_width(dim, reduction)
        self.query_conv = nn.Linear(dim, width)
        self.key_conv = nn.Linear(dim, width)
        self.value_conv = nn.Linear(dim, dim)
        if gamma_init is None:
            self.register_parameter("gamma_position", None)
            self.register_parameter("gamma_channel", None)
        elif isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise ValueError(f"gamma_init={gamma_init!r} must be None or a number")
        else:
            self.gamma_position = nn.Parameter(torch.full((1,), float(gamma_init)))
            self.gamma_channel = nn.Parameter(torch.full((1,), float(gamma_init)))

    def position_attention(self, x: torch.Tensor) -> torch.Tensor:
        """PAM's attention output (without γ and x)."""
        q, k = self.query_conv(x)[..., None, :], self.key_conv(x)[..., None, :]
        v = self.value_conv(x)[..., None, :]
        return attention(q, k, v, scale=1.0)[..., 0, :]

    @staticmethod
    def channel_attention(x: torch.Tensor) -> torch.Tensor:
        """CAM's attention output (without γ and x)."""
        tokens = flatten_tokens(x)  # (B, N, C)
        energy = tokens.transpose(1, 2) @ tokens  # (B, C, C)
        weights = (energy.amax(dim=-1, keepdim=True) - energy).softmax(dim=-1)
        return (tokens @ weights.transpose(1, 2)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        position, channel = self.position_attention(x), self.channel_attention(x)
        if self.gamma_position is None:
            return position + channel
        return self.gamma_position * position + self.gamma_channel * channel

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, qk_width={self.query_conv.out_features}"
