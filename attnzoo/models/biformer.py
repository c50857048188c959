"""BiFormer (Zhu, Wang, Ke, Zhang, Lau; CVPR 2023, arXiv 2303.08810): bi-level routing attention backbones.

Definition read from the official code, rayleizhu/BiFormer ``models/biformer.py`` (``biformer_tiny/small/base``) and
``models/_common.py``: a stem of two 3×3 stride-2 convolutions (BatchNorm, GELU between, BatchNorm after); between
stages a 3×3 stride-2 convolution and BatchNorm; blocks ``x ← x + DWConv3×3(x)`` (conv position embedding), then
``x + Attn(LN(x))``, ``x + MLP(LN(x))`` (LayerNorm eps 1e-6, MLP ratio 3, no layer scale); a final BatchNorm, global
average pool and linear head. Stages 0–2 use the registered ``bi_level_routing`` mechanism (7×7 regions, top-k 1, 4,
16; qk width = width; heads of width 32; LCE 5×5 depthwise conv on V); the last stage (top-k −2 in the official
configuration) is ``AttentionLePE``: global attention with 8 heads, no qkv bias, scale head_dim^-1/2, plus the 5×5
depthwise conv of V, written here with ``attnzoo.ops.attention``. Stage maps are channels-last.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..mechanisms import create as create_mechanism
from ..mechanisms._base import merge_heads, split_qkv
from ..ops import attention
from ._paper import (
    DropPath,
    Mlp,
    PaperModel,
    PaperTable,
    Stage,
    check_heads,
    check_per_stage,
    conv_out,
    drop_path_rates,
    in_stage,
    init_transformer_weights,
    register_paper_model,
)

__all__ = ["BiFormer", "BiFormerBlock", "AttentionLePE"]

REFERENCE = "rayleizhu/BiFormer models/biformer.py, models/_common.py, ops/bra_legacy.py"
PAPER = "Zhu et al., BiFormer, CVPR 2023, ImageNet-1k classification table (224²; same figures in the official README)"


class ChannelsLastBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the channels of a channels-last ``(B, H, W, C)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvBN(nn.Sequential):
    """Convolutions with BatchNorm: image or channels-last map → channels-last map (stem: conv-BN-GELU-conv-BN)."""

    def __init__(self, in_chans: int, dim: int, stem: bool) -> None:
        if stem:
            layers = [
                nn.Conv2d(in_chans, dim // 2, 3, 2, 1),
                nn.BatchNorm2d(dim // 2),
                nn.GELU(),
                nn.Conv2d(dim // 2, dim, 3, 2, 1),
            ]
        else:
            layers = [nn.Conv2d(in_chans, dim, 3, 2, 1)]
        super().__init__(*layers, nn.BatchNorm2d(dim))
        self.channels_last_in = not stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_in:
            x = x.permute(0, 3, 1, 2)
        return super().forward(x).permute(0, 2, 3, 1)


class AttentionLePE(nn.Module):
    """Global multi-head attention plus a depthwise conv of V, on ``(B, H, W, C)``: BiFormer's last stage
    (``AttentionLePE``, 5×5) and SMT's multi-head self-attention blocks (``Attention(ca_attention=0)``, 3×3).

    Args:
        dim: channels.
        num_heads: heads (8 in the official code).
        side_dwconv: kernel of the depthwise conv of V.
        qkv_bias: bias in the q/k/v projection (none in the official code).
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = merge_heads(attention(q, k, v))
        lepe = self.lepe(merge_heads(v).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out + lepe)


class BiFormerBlock(nn.Module):
    """BiFormer block on ``(B, H, W, C)``: ``x + DWConv(x)``, ``x + Attn(LN(x))``, ``x + MLP(LN(x))``.

    Args:
        dim: channels.
        num_heads: heads of bi-level routing attention.
        topk: routed regions per region; ``-2`` selects ``AttentionLePE`` (global attention).
        n_win: regions per side.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic-depth rate of both branches.
    """

    def __init__(
        self, dim: int, num_heads: int, topk: int, n_win: int, mlp_ratio: float, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk == -2:
            self.attn: nn.Module = AttentionLePE(dim)
        else:
            self.attn = create_mechanism(
                "bi_level_routing", dim, num_heads=num_heads, num_windows=n_win, topk=topk, qk_dim=dim, kernel_size=5, qkv_bias=True
            )  # fmt: skip
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BiFormer(PaperModel):
    """BiFormer backbone (Zhu et al., 2023); see the module docstring.

    Args:
        dims: width per stage.
        depths: blocks per stage.
        topks: routed regions per stage (``-2``: global attention with LePE).
        head_dim: width of a routing-attention head.
        n_win: regions per side.
        mlp_ratio: MLP hidden width / width.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        num_classes: classifier outputs (0: no head).
        in_chans: image channels.
        img_size: image side.
        name: the configuration's name.
    """

    def __init__(
        self,
        *,
        dims: Sequence[int],
        depths: Sequence[int],
        topks: Sequence[int] = (1, 4, 16, -2),
        head_dim: int = 32,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        name: str = "biformer",
    ) -> None:
        levels = len(dims)
        check_per_stage(levels, f"dims={list(dims)}", depths=depths, topks=topks)
        rates = drop_path_rates(drop_path_rate, depths)
        grid = conv_out(conv_out(img_size))
        stages = []
        for i in range(levels):
            if i > 0:
                grid = conv_out(grid)
            if topks[i] != -2:
                if dims[i] % head_dim:
                    raise ValueError(f"stage {i}: head_dim={head_dim} must divide the width {dims[i]}")
                if not 1 <= topks[i] <= n_win * n_win:
                    raise ValueError(f"stage {i}: topk={topks[i]} must be -2 (global) or in 1..n_win²={n_win * n_win}")
            else:
                check_heads(i, dims[i], 8)
            with in_stage(i):
                blocks = [
                    BiFormerBlock(dims[i], dims[i] // head_dim, topks[i], n_win, mlp_ratio, rates[i][j])
                    for j in range(depths[i])
                ]
            stages.append(Stage(ConvBN(dims[i - 1], dims[i], stem=False) if i > 0 else None, blocks))
        super().__init__(
            ConvBN(in_chans, dims[0], stem=True),
            stages,
            dims,
            [4 * 2**i for i in range(levels)],
            num_classes,
            ChannelsLastBatchNorm(dims[-1]),
            name=name,
            in_chans=in_chans,
            img_size=img_size,
        )
        self.apply(init_transformer_weights)


_CONFIGS: dict[str, tuple[dict[str, Any], tuple[float, float, float]]] = {
    "biformer_tiny": (dict(dims=(64, 128, 256, 512), depths=(2, 2, 8, 2)), (13.1, 2.2, 81.4)),
    "biformer_small": (dict(dims=(64, 128, 256, 512), depths=(4, 4, 18, 4), drop_path_rate=0.15), (25.5, 4.5, 83.8)),
    "biformer_base": (dict(dims=(96, 192, 384, 768), depths=(4, 4, 18, 4)), (56.8, 9.8, 84.3)),
}


def _builder(name: str, config: dict[str, Any]):
    def build(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any) -> BiFormer:
        return BiFormer(
            **{**config, **overrides}, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name=name
        )

    build.__name__ = name
    build.__doc__ = (
        f"{name}; drop_path_rate is the official training value where the repository states it (small: 0.15), else 0."
    )
    return build


for _name, (_config, (_params, _gmacs, _top1)) in _CONFIGS.items():
    register_paper_model(
        _name,
        _builder(_name, _config),
        PaperTable(_params, _gmacs, _top1, PAPER),
        family="biformer",
        reference=REFERENCE,
    )
