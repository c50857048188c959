"""LITv2: Fast Vision Transformers with HiLo Attention (Pan, Cai, Zhuang; NeurIPS 2022, arXiv 2205.13213).

Definition read from the official code, ziplab/LITv2 ``classification/models/{litv2,layers,blocks,patch_embed}.py``
and ``configs/litv2-small.yaml``: a 4×4 stride-4 patch embedding with LayerNorm; stages 0–1 hold only MLP blocks
``x + ConvFFN(LN(x))`` (no attention: LITv2 drops the early MSAs), stages 2–3 blocks ``x + HiLo(LN(x))``,
``x + ConvFFN(LN(x))``; ``ConvFFN`` = fc1, 3×3 depthwise conv, GELU, fc2 (MLP ratio 4); between stages deformable token
merging (DTM: a 2×2 stride-2 deformable convolution whose offsets come from a 2×2 stride-2 convolution, then
BatchNorm and GELU); a final LayerNorm, global average pool and linear head. HiLo is the registered ``hilo``
mechanism with alpha 0.9, qkv bias, window 2 in stage 2 and window 1 (all heads Lo-Fi without pooling, i.e. plain
multi-head attention) in stage 3. Stage maps are channels-last.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mechanisms import create as create_mechanism
from ._paper import (
    DropPath,
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

__all__ = ["LITv2", "DeformableTokenMerging", "deform_conv2d_stride_k"]

REFERENCE = (
    "ziplab/LITv2 classification/models/litv2.py, layers.py, blocks.py, patch_embed.py, configs/litv2-small.yaml"
)
PAPER = "Pan et al., Fast Vision Transformers with HiLo Attention, NeurIPS 2022, ImageNet-1k classification table (LITv2-S, 224²)"


def deform_conv2d_stride_k(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Deformable convolution (Dai et al., 2017) with kernel = stride = ``k`` and no padding, on ``(B, C, H, W)``.

    ``offset``: ``(B, 2·k·k, H/k, W/k)``, (dy, dx) per tap in row-major tap order, as in torchvision/mmcv. Each tap
    samples the input bilinearly at its shifted position (zero outside the map), then the taps are contracted with
    ``weight`` ``(C_out, C, k, k)``.
    """
    b, c, h, w = x.shape
    k = weight.shape[-1]
    oh, ow = offset.shape[-2:]
    dy, dx = offset.unflatten(1, (k * k, 2)).unbind(2)  # (B, k·k, oh, ow) each
    ky, kx = torch.meshgrid(torch.arange(k, device=x.device), torch.arange(k, device=x.device), indexing="ij")
    base_y = torch.arange(oh, device=x.device)[:, None] * k  # (oh, 1)
    base_x = torch.arange(ow, device=x.device)[None, :] * k
    y = base_y + ky.reshape(-1, 1, 1) + dy  # (B, k·k, oh, ow) in pixel units
    xx = base_x + kx.reshape(-1, 1, 1) + dx
    grid = torch.stack((2 * xx / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1), dim=-1).to(x.dtype)
    sampled = F.grid_sample(x, grid.flatten(1, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    sampled = sampled.unflatten(2, (k * k, oh))  # (B, C, k·k, oh, ow)
    out = torch.einsum("bctyx,oct->boyx", sampled, weight.flatten(2))
    return out if bias is None else out + bias[:, None, None]


class DeformableTokenMerging(nn.Module):
    """DTM (LITv2): 2×2 stride-2 deformable conv (``dim`` → ``2·dim``) with learned offsets, BatchNorm, GELU; NHWC.

    Offsets start at zero (the official ``conv_offset`` is zero-initialised), so DTM starts as a plain 2×2 conv.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(dim, 2 * 2 * 2, kernel_size=2, stride=2)
        self.weight = nn.Parameter(torch.empty(2 * dim, dim, 2, 2))
        self.bias = nn.Parameter(torch.zeros(2 * dim))
        self.norm = nn.BatchNorm2d(2 * dim)
        self.act = nn.GELU()
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        y = deform_conv2d_stride_k(x, self.conv_offset(x), self.weight, self.bias)
        return self.act(self.norm(y)).permute(0, 2, 3, 1)


class ConvFFN(nn.Module):
    """fc1 → 3×3 depthwise conv → GELU → fc2 on ``(B, H, W, C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(h))


class LITBlock(nn.Module):
    """LITv2 block on ``(B, H, W, C)``: ``x + HiLo(LN(x))`` (when ``num_heads`` is given), then ``x + ConvFFN(LN(x))``.

    Args:
        dim: channels.
        num_heads: HiLo heads, or ``None`` for an MLP-only block (stages 0–1).
        window_size: HiLo's Hi-Fi window (1: plain attention).
        alpha: share of Lo-Fi heads.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic-depth rate.
    """

    def __init__(
        self, dim: int, num_heads: int | None, window_size: int, alpha: float, mlp_ratio: float, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        if num_heads is not None:
            self.norm1 = nn.LayerNorm(dim)
            self.attn = create_mechanism(
                "hilo", dim, num_heads=num_heads, window_size=window_size, alpha=alpha, qkv_bias=True
            )
        else:
            self.norm1 = self.attn = None
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LITv2(PaperModel):
    """LITv2 backbone (Pan et al., 2022); see the module docstring.

    Args:
        embed_dim: width of the first stage (doubled at each stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        has_msa: whether each stage's blocks hold HiLo attention.
        window_sizes: HiLo window per stage.
        alpha: share of Lo-Fi heads.
        mlp_ratio: MLP hidden width / width.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        num_classes: classifier outputs (0: no head).
        in_chans: image channels.
        img_size: image side (every merged stage needs an even map, as DTM requires).
        name: the configuration's name.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        has_msa: Sequence[bool] = (False, False, True, True),
        window_sizes: Sequence[int] = (0, 0, 2, 1),
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        name: str = "litv2",
    ) -> None:
        levels = len(depths)
        check_per_stage(
            levels, f"depths={list(depths)}", num_heads=num_heads, has_msa=has_msa, window_sizes=window_sizes
        )
        dims = [embed_dim * 2**i for i in range(levels)]
        rates = drop_path_rates(drop_path_rate, depths)
        grid = conv_out(img_size, 4, 4, 0)
        stages = []
        for i in range(levels):
            if i > 0:
                grid = halve_grid(i - 1, grid, "deformable token merging", img_size)
            heads = num_heads[i] if has_msa[i] else None
            if heads is not None:
                check_heads(i, dims[i], heads)
            with in_stage(i):
                blocks = [
                    LITBlock(dims[i], heads, window_sizes[i], alpha, mlp_ratio, rates[i][j]) for j in range(depths[i])
                ]
            stages.append(Stage(DeformableTokenMerging(dims[i - 1]) if i > 0 else None, blocks))
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
        )
        self.apply(init_transformer_weights)


def build_litv2_small(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any) -> LITv2:
    """LITv2-S: width 96, depths 2, 2, 6, 2, heads 3, 6, 12, 24, alpha 0.9, windows 0, 0, 2, 1, stochastic depth 0.2."""
    config = dict(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        alpha=0.9,
        window_sizes=(0, 0, 2, 1),
        drop_path_rate=0.2,
    )
    return LITv2(
        **{**config, **overrides}, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name="litv2_small"
    )


register_paper_model(
    "litv2_small", build_litv2_small, PaperTable(28, 3.7, 82.0, PAPER), family="litv2", reference=REFERENCE
)
