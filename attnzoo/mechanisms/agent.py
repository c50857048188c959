"""Agent attention: a few pooled agent tokens first gather from all keys, then broadcast back to every query."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_resolution, resolve_heads
from .registry import register_mechanism

__all__ = ["AgentAttention"]


def _resize(table: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear/bilinear resize (align_corners=False) of ``table[..., *grid]`` to ``size`` over its trailing axes."""
    if tuple(table.shape[-len(size) :]) == tuple(size):
        return table
    lead = table.shape[: -len(size)]
    flat = table.reshape(1, -1, *table.shape[-len(size) :])
    mode = "bilinear" if len(size) == 2 else "linear"
    return F.interpolate(flat, size=size, mode=mode, align_corners=False).reshape(*lead, *size)


@register_mechanism(
    "agent",
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    year=2023,
    native_rank=2,
    complexity="linear",
    reference="LeapLabTHU/Agent-Attention agent_transformer/models/agent_swin.py::AgentAttention (official)",
    needs_input_size=True,
    test_kwargs={"num_heads": 2, "num_agents": 4, "input_resolution": (6, 6)},
    test_size=(6, 6),
)
class AgentAttention(Mechanism):
    """Agent attention (Han et al., 2023): softmax attention through ``num_agents`` pooled agent tokens, O(N·n).

    Agents ``A = AvgPool_{√n×√n}(Q)``; per head ``V_A = SM(s·AKᵀ + B₁)V`` then ``O = SM(s·QAᵀ + B₂)V_A``, plus a
    depthwise 3×3 convolution of V. The position biases ``B₁, B₂`` are a 7×7 agent table bilinearly resized to the
    input plus per-row and per-column tables sized by ``input_resolution``; another input size resizes the row and
    column tables linearly (align_corners=False). Input ``(B, H, W, C)``.
    """

    spatial_ranks = (2,)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        num_agents: int = 49,
        input_resolution: int | tuple[int, int] = (56, 56),
        agent_table_size: int = 7,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        if not isinstance(num_agents, int) or num_agents < 1 or math.isqrt(num_agents) ** 2 != num_agents:
            raise ValueError(f"num_agents={num_agents!r} must be a perfect square (agents are pooled on a square grid)")
        self.num_agents = num_agents
        self.input_resolution = check_resolution("input_resolution", input_resolution)
        h, n, (rows, cols), t = self.num_heads, num_agents, self.input_resolution, agent_table_size
        inner = h * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.dwc = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(num_agents))
        # B₁ (agent → key) and B₂ (query → agent): a resized agent table plus row and column tables.
        self.agent_key_table = nn.Parameter(torch.zeros(h, n, t, t))
        self.agent_row_bias = nn.Parameter(torch.zeros(h, n, rows))
        self.agent_col_bias = nn.Parameter(torch.zeros(h, n, cols))
        self.query_agent_table = nn.Parameter(torch.zeros(h, n, t, t))
        self.row_agent_bias = nn.Parameter(torch.zeros(h, n, rows))
        self.col_agent_bias = nn.Parameter(torch.zeros(h, n, cols))
        for p in self.bias_parameters():
            nn.init.trunc_normal_(p, std=0.02)

    def bias_parameters(self) -> list[nn.Parameter]:
        return [
            self.agent_key_table,
            self.agent_row_bias,
            self.agent_col_bias,
            self.query_agent_table,
            self.row_agent_bias,
            self.col_agent_bias,
        ]

    def position_biases(self, rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``B₁`` ``[1, h, n, N]`` and ``B₂`` ``[1, h, N, n]`` for a ``rows × cols`` input."""

        def grid(table, row, col):
            row, col = _resize(row, (rows,)), _resize(col, (cols,))
            return _resize(table, (rows, cols)) + row[..., :, None] + col[..., None, :]

        agent_key = grid(self.agent_key_table, self.agent_row_bias, self.agent_col_bias)
        query_agent = grid(self.query_agent_table, self.row_agent_bias, self.col_agent_bias)
        b1 = rearrange(agent_key, "h n y x -> 1 h n (y x)")
        b2 = rearrange(query_agent, "h n y x -> 1 h (y x) n")
        return b1.to(dtype), b2.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.check_input(x)
        q, k, v = rearrange(self.qkv(x), "b y x (three c) -> three b y x c", three=3)
        agents = rearrange(self.pool(q.permute(0, 3, 1, 2)), "b (h d) p r -> b (p r) h d", h=self.num_heads)
        q, k, v_heads = (rearrange(t, "b y x (h d) -> b (y x) h d", h=self.num_heads) for t in (q, k, v))
        b1, b2 = self.position_biases(rows, cols, q.dtype)
        agent_values = attention(agents, k, v_heads, attn_mask=b1)
        out = attention(q, agents, agent_values, attn_mask=b2)
        out = rearrange(out, "b (y x) h d -> b y x (h d)", y=rows)
        out = out + self.dwc(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_agents={self.num_agents}, "
            f"input_resolution={self.input_resolution}"
        )
