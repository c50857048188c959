"""Agent-Swin: Swin Transformer with agent attention (Han, Ye, Han, Pan, Song, Huang; "Agent Attention: On the
Integration of Softmax and Linear Attention", ECCV 2024, arXiv 2312.08874).

Definition read from the official code, LeapLabTHU/Agent-Attention ``agent_transformer/models/agent_swin.py`` and
``cfgs/agent_swin_t.yaml`` (window 56, attention types ``AAAB``, agents 9-16-49-49): Swin-T's layout — a 4×4 stride-4
patch embedding with LayerNorm; pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` (MLP ratio 4); patch merging
(2×2 neighbours concatenated, LayerNorm, linear 4C → 2C without bias) between stages; a final LayerNorm, global
average pool and linear head. Because the configured window (56) covers every stage's map at 224², the official
block clamps the window to the map and sets the shift to 0: stages 0–2 run the registered ``agent`` mechanism over
the whole map (9, 16, 49 agents), stage 3 runs the registered ``window`` mechanism (Swin window attention with its
relative position bias) on one 7×7 window. Stage maps are channels-last.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..mechanisms import create as create_mechanism
from ._paper import (
    DropPath,
    Mlp,
    PaperModel,
    PaperTable,
    PatchEmbed,
    Stage,
    check_heads,
    check_per_stage,
    conv_out,
    drop_path_rates,
    halve_grid,
    in_stage,
    init_transformer_weights,
    register_paper_model,
)

__all__ = ["AgentSwin", "AgentSwinBlock"]

REFERENCE = "LeapLabTHU/Agent-Attention agent_transformer/models/agent_swin.py, cfgs/agent_swin_t.yaml"
PAPER = "Han et al., Agent Attention, ECCV 2024, ImageNet-1k classification table (Agent-Swin-T, 224²; same figures in the official README)"


class PatchMerging(nn.Module):
    """Swin patch merging on ``(B, H, W, C)``: the 2×2 neighbours (Swin's order) concatenated, LayerNorm, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class AgentSwinBlock(nn.Module):
    """Pre-norm block on ``(B, H, W, C)`` with agent attention (``num_agents`` given) or window attention.

    Args:
        dim: channels.
        num_heads: heads.
        grid: the stage's token map (agent attention's position tables are sized by it).
        num_agents: agent tokens, or ``None`` for Swin window attention over ``window_size`` windows.
        window_size: window of the window-attention blocks.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic-depth rate of both branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        num_agents: int | None,
        window_size: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if num_agents is not None:
            self.attn = create_mechanism(
                "agent", dim, num_heads=num_heads, num_agents=num_agents, input_resolution=grid
            )
        else:
            self.attn = create_mechanism("window", dim, num_heads=num_heads, window_size=window_size, shift_size=0)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentSwin(PaperModel):
    """Agent-Swin backbone (Han et al., 2023); see the module docstring.

    Args:
        embed_dim: width of the first stage (doubled at each stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        attn_types: per stage ``"A"`` (agent attention over the whole map) or ``"B"`` (Swin window attention).
        num_agents: agent tokens per stage.
        mlp_ratio: MLP hidden width / width.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        num_classes: classifier outputs (0: no head).
        in_chans: image channels.
        img_size: image side (patch merging needs even maps).
        name: the configuration's name.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        attn_types: str = "AAAB",
        num_agents: Sequence[int] = (9, 16, 49, 49),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        name: str = "agent_swin",
    ) -> None:
        levels = len(depths)
        check_per_stage(
            levels, f"depths={list(depths)}", num_heads=num_heads, attn_types=attn_types, num_agents=num_agents
        )
        dims = [embed_dim * 2**i for i in range(levels)]
        rates = drop_path_rates(drop_path_rate, depths)
        grid = conv_out(img_size, 4, 4, 0)
        stages = []
        for i in range(levels):
            if i > 0:
                grid = halve_grid(i - 1, grid, "patch merging", img_size)
            check_heads(i, dims[i], num_heads[i])
            if attn_types[i] not in "AB":
                raise ValueError(f"stage {i}: attn_types[{i}]={attn_types[i]!r} must be 'A' (agent) or 'B' (window)")
            agents = num_agents[i] if attn_types[i] == "A" else None
            with in_stage(i):
                blocks = [
                    AgentSwinBlock(dims[i], num_heads[i], (grid, grid), agents, grid, mlp_ratio, rates[i][j])
                    for j in range(depths[i])
                ]
            stages.append(Stage(PatchMerging(dims[i - 1]) if i > 0 else None, blocks))
        super().__init__(
            PatchEmbed(in_chans, embed_dim),
            stages,
            dims,
            [4 * 2**i for i in range(levels)],
            num_classes,
            nn.LayerNorm(dims[-1]),
            name=name,
            in_chans=in_chans,
            img_size=img_size,
            crop_pct=0.9,
        )
        self.apply(init_transformer_weights)


def build_agent_swin_tiny(
    num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any
) -> AgentSwin:
    """Agent-Swin-T: width 96, depths 2, 2, 6, 2, heads 3, 6, 12, 24, AAAB, agents 9-16-49-49, stochastic depth 0.2."""
    config = dict(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        attn_types="AAAB",
        num_agents=(9, 16, 49, 49),
        drop_path_rate=0.2,
    )
    return AgentSwin(
        **{**config, **overrides}, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name="agent_swin_tiny"
    )


register_paper_model(
    "agent_swin_tiny",
    build_agent_swin_tiny,
    PaperTable(29, 4.5, 82.6, PAPER),
    family="agent_swin",
    reference=REFERENCE,
    note=(
        "Shifted windows: attnzoo's window mechanism runs shifted windows (SW-MSA) on a padded canvas, which costs "
        "more than Swin's roll; Agent-Swin-T at 224² has no shifted block (its 56-token window covers every stage's "
        "map, so the official block sets the shift to 0), so this model's figures and speed are unaffected."
    ),
)
