"""CSWin Transformer (Dong, Bao, Chen, Zhang, Yu, Yuan, Chen, Guo; CVPR 2022, arXiv 2107.00652).

Definition read from the official code, microsoft/CSWin-Transformer ``models/cswin.py``: a 7×7 stride-4 convolution
(padding 2) and a LayerNorm; four stages of pre-norm blocks ``x + CSWinAttn(LN(x))``, ``x + MLP(LN(x))`` (MLP ratio 4,
no layer scale); between stages a 3×3 stride-2 convolution and a LayerNorm (``Merge_Block``); a final LayerNorm,
global average pool and linear head. The attention is the registered ``cross_shaped`` mechanism: one qkv projection
(with bias), half of the heads in vertical and half in horizontal stripes of width ``split_size`` (1, 2, 7, 7), each
with LePE (a 3×3 depthwise conv of V), then one output projection. A stage whose map equals its stripe width, and
always the last stage, uses one branch of global attention (``last_stage``), as the official block decides.
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
    Stage,
    check_heads,
    check_per_stage,
    conv_out,
    drop_path_rates,
    in_stage,
    init_transformer_weights,
    register_paper_model,
)

__all__ = ["CSWin", "CSWinBlock"]

REFERENCE = "microsoft/CSWin-Transformer models/cswin.py"
PAPER = "Dong et al., CSWin Transformer, CVPR 2022, ImageNet-1k classification table (224²; same figures in the official README)"


class ConvEmbed(nn.Module):
    """``kernel_size`` convolution with ``stride`` and ``padding``, then LayerNorm: ``(B, C, H, W)`` or NHWC → NHWC."""

    def __init__(
        self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int, channels_last_in: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(dim)
        self.channels_last_in = channels_last_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_in:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWinBlock(nn.Module):
    """CSWin block on ``(B, H, W, C)``: ``x + CSWinAttn(LN(x))``, ``x + MLP(LN(x))``.

    Args:
        dim: channels.
        num_heads: heads (split between the two stripe directions).
        split_size: stripe width.
        last_stage: one branch of global attention instead of two stripe branches.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic-depth rate of both branches.
    """

    def __init__(
        self, dim: int, num_heads: int, split_size: int, last_stage: bool, mlp_ratio: float, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = create_mechanism(
            "cross_shaped", dim, num_heads=num_heads, window_size=split_size, last_stage=last_stage, qkv_bias=True
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CSWin(PaperModel):
    """CSWin Transformer backbone (Dong et al., 2022); see the module docstring.

    Args:
        embed_dim: width of the first stage (doubled at each stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        split_sizes: stripe width per stage.
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
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        split_sizes: Sequence[int] = (1, 2, 7, 7),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        name: str = "cswin",
    ) -> None:
        levels = len(depths)
        check_per_stage(levels, f"depths={list(depths)}", num_heads=num_heads, split_sizes=split_sizes)
        dims = [embed_dim * 2**i for i in range(levels)]
        grid = conv_out(img_size, 7, 4, 2)
        rates = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(levels):
            if i > 0:
                grid = conv_out(grid)
            check_heads(i, dims[i], num_heads[i])
            if not isinstance(split_sizes[i], int) or not 1 <= split_sizes[i] <= grid:
                raise ValueError(
                    f"stage {i} ({grid}×{grid} tokens): split_size={split_sizes[i]!r} must be an int in 1..{grid}"
                )
            last = i == levels - 1 or split_sizes[i] == grid
            with in_stage(i):
                blocks = [
                    CSWinBlock(dims[i], num_heads[i], split_sizes[i], last, mlp_ratio, rates[i][j])
                    for j in range(depths[i])
                ]
            down = ConvEmbed(dims[i - 1], dims[i], 3, 2, 1, channels_last_in=True) if i > 0 else None
            stages.append(Stage(down, blocks))
        super().__init__(
            ConvEmbed(in_chans, embed_dim, 7, 4, 2, channels_last_in=False),
            stages,
            dims,
            [4 * 2**i for i in range(levels)],
            num_classes,
            nn.LayerNorm(dims[-1]),
            name=name,
            in_chans=in_chans,
            img_size=img_size,
        )
        self.apply(init_transformer_weights)


_CONFIGS: dict[str, tuple[dict[str, Any], tuple[float, float, float]]] = {
    "cswin_tiny": (
        dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), drop_path_rate=0.2),
        (23, 4.3, 82.8),
    ),
    "cswin_small": (
        dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.4),
        (35, 6.9, 83.6),
    ),
    "cswin_base": (
        dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
        (78, 15.0, 84.2),
    ),
}


def _builder(name: str, config: dict[str, Any]):
    def build(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any) -> CSWin:
        return CSWin(
            **{**config, **overrides}, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name=name
        )

    build.__name__ = name
    return build


_PARAMS_NOTE = (
    "Parameters: the paper prints {paper}M; the official definition (models/cswin.py) has {exact} parameters, which "
    "this model matches exactly (counted by hand: 12·C²+23·C per block, stem, three merge convs, norm, head), "
    "{error} against the printed figure."
)
_DOCUMENTED = {
    "cswin_tiny": (_PARAMS_NOTE.format(paper=23, exact="22,320,552", error="−2.95 %"), -0.0295),
    "cswin_small": (_PARAMS_NOTE.format(paper=35, exact="34,643,304", error="−1.02 %"), -0.0102),
}

for _name, (_config, (_params, _gmacs, _top1)) in _CONFIGS.items():
    _note, _error = _DOCUMENTED.get(_name, ("", None))
    register_paper_model(
        _name,
        _builder(_name, _config),
        PaperTable(_params, _gmacs, _top1, PAPER),
        family="cswin",
        reference=REFERENCE,
        note=_note,
        documented_params_error=_error,
    )
