"""VAN: Visual Attention Network (Guo, Lu, Liu, Cheng, Hu; Computational Visual Media 2023, arXiv 2202.09741).

Definition read from the official code, Visual-Attention-Network/VAN-Classification ``models/van.py``: four stages,
each an overlapping patch embedding (7×7 stride-4 conv for the first, 3×3 stride-2 after; BatchNorm), blocks
``x + λ₁·(Attn(BN(x)))``, ``x + λ₂·Mlp(BN(x))`` with layer scales λ initialised to 1e-2, and a LayerNorm (eps 1e-6)
over the channels at the end of every stage. ``Attn(u) = proj₂(LKA(GELU(proj₁(u)))) + u`` — the registered
``large_kernel`` mechanism (LKA: 5×5 depthwise, 7×7 depthwise dilated 3, 1×1; with the 1×1 projections) plus VAN's
identity inside the attention module; ``Mlp`` is 1×1 conv, 3×3 depthwise conv, GELU, 1×1 conv. The head averages the
last stage's normalised tokens. Feature maps are ``(B, C, H, W)`` (``channels_last = False``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..mechanisms import create as create_mechanism
from ._paper import (
    DropPath,
    PaperModel,
    PaperTable,
    Stage,
    check_per_stage,
    conv_out,
    drop_path_rates,
    init_fan_out_weights,
    register_paper_model,
)

__all__ = ["VAN", "VANBlock"]

REFERENCE = "Visual-Attention-Network/VAN-Classification models/van.py"
PAPER = "Guo et al., Visual Attention Network, CVMJ 2023, ImageNet-1k classification table (224²; same figures in the official README)"


class OverlapPatchEmbed(nn.Module):
    """Conv ``patch_size``×``patch_size`` with ``stride`` and padding ``patch_size // 2``, then BatchNorm (NCHW)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ConvMlp(nn.Module):
    """1×1 conv → 3×3 depthwise conv → GELU → 1×1 conv, on ``(B, C, H, W)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class VANBlock(nn.Module):
    """VAN block on ``(B, C, H, W)``: ``x + λ₁·(LKA-attention(BN(x)) + BN(x))``, ``x + λ₂·Mlp(BN(x))``.

    Args:
        dim: channels.
        mlp_ratio: MLP hidden width / ``dim``.
        kernel_size: LKA's decomposed kernel extent (21 in the paper).
        dilation: LKA's dilation (3 in the paper).
        drop_path: stochastic-depth rate of both branches.
        layer_scale: initial value of λ₁, λ₂.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        kernel_size: int = 21,
        dilation: int = 3,
        drop_path: float = 0.0,
        layer_scale: float = 1e-2,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = create_mechanism("large_kernel", dim, kernel_size=kernel_size, dilation=dilation, projections=True)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm1(x)
        a = self.attn(u.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + u  # VAN's Attention adds its input
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * a)
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class VANStage(Stage):
    """Patch embedding (except in the first stage, where it is the model's stem), blocks, LayerNorm over channels."""

    def __init__(self, downsample: nn.Module | None, blocks: Sequence[nn.Module], dim: int) -> None:
        super().__init__(downsample, blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VAN(PaperModel):
    """VAN backbone (Guo et al., 2022); see the module docstring.

    Args:
        dims: width per stage.
        depths: blocks per stage.
        mlp_ratios: MLP ratio per stage.
        kernel_size: LKA kernel extent.
        dilation: LKA dilation.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        num_classes: classifier outputs (0: no head).
        in_chans: image channels.
        img_size: image side (checked: every stage needs at least one token).
        name: the configuration's name.
    """

    channels_last = False

    def __init__(
        self,
        *,
        dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float],
        kernel_size: int = 21,
        dilation: int = 3,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        name: str = "van",
    ) -> None:
        stages_n = len(dims)
        check_per_stage(stages_n, f"dims={list(dims)}", depths=depths, mlp_ratios=mlp_ratios)
        grid = conv_out(img_size, 7, 4, 3)
        rates = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(stages_n):
            if i > 0:
                grid = conv_out(grid)
            if grid < 1:
                raise ValueError(f"stage {i}: img_size={img_size} leaves no tokens")
            blocks = [VANBlock(dims[i], mlp_ratios[i], kernel_size, dilation, rates[i][j]) for j in range(depths[i])]
            down = OverlapPatchEmbed(dims[i - 1], dims[i], 3, 2) if i > 0 else None
            stages.append(VANStage(down, blocks, dims[i]))
        super().__init__(
            OverlapPatchEmbed(in_chans, dims[0], 7, 4),
            stages,
            dims,
            [4 * 2**i for i in range(stages_n)],
            num_classes,
            nn.Identity(),
            name=name,
            in_chans=in_chans,
            img_size=img_size,
        )
        self.apply(init_fan_out_weights)


_CONFIGS: dict[str, tuple[dict[str, Any], tuple[float, float, float]]] = {
    "van_b0": (
        dict(dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.1),
        (4.1, 0.9, 75.4),
    ),
    "van_b1": (
        dict(dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.1),
        (13.9, 2.5, 81.1),
    ),
    "van_b2": (
        dict(dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.1),
        (26.6, 5.0, 82.8),
    ),
    "van_b3": (
        dict(dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.2),
        (44.8, 9.0, 83.9),
    ),
}


def _builder(name: str, config: dict[str, Any]):
    def build(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any) -> VAN:
        return VAN(**{**config, **overrides}, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name=name)

    build.__name__ = name
    return build


_B0_NOTE = (
    "MACs: the paper prints 0.9 G, rounded to one decimal; convolutions and the head measure 0.864 G here (−3.98 %). "
    "mmpretrain's counter, which also counts BatchNorm/LayerNorm (2 FLOPs per element), reports 0.88 G for the "
    "official model (configs/van/metafile.yml); the convolution MACs are the same."
)

for _name, (_config, (_params, _gmacs, _top1)) in _CONFIGS.items():
    register_paper_model(
        _name,
        _builder(_name, _config),
        PaperTable(_params, _gmacs, _top1, PAPER),
        family="van",
        reference=REFERENCE,
        note=_B0_NOTE if _name == "van_b0" else "",
        documented_macs_error=-0.0398 if _name == "van_b0" else None,
    )
