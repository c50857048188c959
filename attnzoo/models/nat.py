"""NAT and DiNAT: Neighborhood Attention Transformer and Dilated Neighborhood Attention Transformer.

Hassani, Walton, Li, Li, Shi, *Neighborhood Attention Transformer*, CVPR 2023 (arXiv 2204.07143);
Hassani, Shi, *Dilated Neighborhood Attention Transformer*, arXiv 2209.15001, 2022.
Definitions read from the official code, SHI-Labs/Neighborhood-Attention-Transformer ``classification/nat.py`` and
``classification/dinat.py``: a tokenizer of two 3×3 stride-2 convolutions (no activation between) and a LayerNorm; four
levels of pre-norm blocks ``x + γ₁·NA(LN(x))``, ``x + γ₂·MLP(LN(x))`` (layer scale γ only in NAT-S/B and DiNAT-B,
initialised to 1e-5), NA with a 7×7 kernel and a relative position bias; between levels a 3×3 stride-2 convolution
without bias that doubles the width, then a LayerNorm; a final LayerNorm, global average pool and linear head.
DiNAT alternates NA (dilation 1) and DiNA layers with dilations 8, 4, 2, 1 per level at 224² (the DiNAT paper, §4.1:
dilation = the largest that fits the level's map, 56/7, 28/7, 14/7, 7/7).

Official checkpoints load with ``load_official_state_dict(model, state_dict)``; the key map (``official_key``):

==================================================  ==================================================
official (``NAT`` / ``DiNAT``)                      attnzoo
==================================================  ==================================================
``patch_embed.proj.{0,1}.*``, ``patch_embed.norm.*``  ``stem.proj.{0,1}.*``, ``stem.norm.*``
``levels.i.blocks.j.{norm1,norm2,mlp.fc1,mlp.fc2}``   ``stages.i.blocks.j.`` same names
``levels.i.blocks.j.attn.{qkv,proj}.*, .attn.rpb``    ``stages.i.blocks.j.attn.`` same names
``levels.i.blocks.j.gamma{1,2}``                     ``stages.i.blocks.j.gamma{1,2}``
``levels.i.downsample.{reduction,norm}.*``            ``stages.(i+1).downsample.{reduction,norm}.*``
``norm.*``, ``head.*``                               same names
==================================================  ==================================================
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

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
    check_kernel_fits,
    conv_out,
    drop_path_rates,
    init_transformer_weights,
    register_paper_model,
)

__all__ = ["NAT", "NATBlock", "official_key", "load_official_state_dict"]

REFERENCE = "SHI-Labs/Neighborhood-Attention-Transformer classification/nat.py, classification/dinat.py"


class ConvTokenizer(nn.Module):
    """Two 3×3 stride-2 convolutions (``dim/2`` then ``dim`` channels) and a LayerNorm: image → ``(B, H/4, W/4, dim)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3×3 stride-2 convolution without bias (``dim`` → ``2·dim``) and a LayerNorm, on ``(B, H, W, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """NAT layer: ``x + γ₁·NA(LN(x))``, ``x + γ₂·MLP(LN(x))`` on ``(B, H, W, C)``.

    Args:
        dim: channels.
        num_heads: attention heads.
        kernel_size: neighborhood extent.
        dilation: neighborhood dilation (1 = NA, > 1 = DiNA).
        mlp_ratio: MLP hidden width / ``dim``.
        layer_scale: initial value of the per-channel scales γ, or ``None`` for none.
        drop_path: stochastic-depth rate of both branches.
        qkv_bias: bias in the q/k/v projection.
        backend: engine backend of the neighborhood op.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int,
        mlp_ratio: float,
        layer_scale: float | None,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = create_mechanism(
            "neighborhood",
            dim,
            num_heads=num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            rel_pos_bias=True,
            qkv_bias=qkv_bias,
            backend=backend,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma2 is None else self.gamma2 * m)


class NAT(PaperModel):
    """NAT / DiNAT backbone (Hassani et al., 2022); see the module docstring for the layout.

    Args:
        depths: blocks per level.
        num_heads: heads per level.
        embed_dim: width of the first level (doubled at each level).
        mlp_ratio: MLP hidden width / width.
        kernel_size: neighborhood extent in every layer.
        dilations: per level, one dilation per block (DiNAT), or ``None`` for dilation 1 everywhere (NAT).
        layer_scale: initial layer-scale value, or ``None``.
        drop_path_rate: stochastic depth, rising linearly to this rate over all blocks.
        qkv_bias: bias in the q/k/v projections.
        num_classes: classifier outputs (0: no head).
        in_chans: image channels.
        img_size: image side the neighborhoods are checked against (every level's map must hold kernel·dilation).
        backend: engine backend of the neighborhood op.
        name: the configuration's name (``pretrained_cfg["architecture"]``).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        num_heads: Sequence[int],
        embed_dim: int,
        mlp_ratio: float,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        layer_scale: float | None = None,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        backend: str = "auto",
        name: str = "nat",
    ) -> None:
        levels = len(depths)
        if len(num_heads) != levels:
            raise ValueError(
                f"num_heads={list(num_heads)} must have one entry per level ({levels}, from depths={list(depths)})"
            )
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != levels:
            raise ValueError(f"dilations has {len(dilations)} levels, depths={list(depths)} has {levels}")
        dims = [embed_dim * 2**i for i in range(levels)]
        grid = (conv_out(conv_out(img_size)),) * 2
        rates = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(levels):
            if i > 0:
                grid = (conv_out(grid[0]), conv_out(grid[1]))
            check_heads(i, dims[i], num_heads[i])
            if len(dilations[i]) != depths[i]:
                raise ValueError(
                    f"stage {i}: dilations={list(dilations[i])} must have one entry per block ({depths[i]})"
                )
            for d in dilations[i]:
                check_kernel_fits(i, grid, kernel_size, d)
            blocks = [
                NATBlock(
                    dims[i],
                    num_heads[i],
                    kernel_size,
                    dilations[i][j],
                    mlp_ratio,
                    layer_scale,
                    rates[i][j],
                    qkv_bias,
                    backend,
                )
                for j in range(depths[i])
            ]
            stages.append(Stage(ConvDownsampler(dims[i - 1]) if i > 0 else None, blocks))
        super().__init__(
            ConvTokenizer(in_chans, embed_dim),
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

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}


_OFFICIAL_RULES = (
    (re.compile(r"^patch_embed\."), lambda m: "stem."),
    (re.compile(r"^levels\.(\d+)\.blocks\."), lambda m: f"stages.{m.group(1)}.blocks."),
    (re.compile(r"^levels\.(\d+)\.downsample\."), lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
)


def official_key(key: str) -> str:
    """The attnzoo name of a key of the official NAT/DiNAT state dict (see the module docstring's table)."""
    for pattern, repl in _OFFICIAL_RULES:
        match = pattern.match(key)
        if match:
            return repl(match) + key[match.end() :]
    return key


def load_official_state_dict(model: NAT, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """Load a state dict saved by the official NAT/DiNAT code (``model.state_dict()`` or a ``{"model": …}`` checkpoint).

    Raises a ValueError naming the keys that are missing or unexpected after renaming, or whose shapes differ.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    renamed = {official_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    wrong = [
        f"{k}: {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in renamed and renamed[k].shape != own[k].shape
    ]
    if wrong or (strict and (missing or unexpected)):
        raise ValueError(
            f"official state dict does not fit {model.pretrained_cfg['architecture']}: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {wrong[:5]}"
        )
    return model.load_state_dict(renamed, strict=strict)


# ---- published configurations -------------------------------------------------------------------------------------

NAT_PAPER = (
    "Hassani et al., Neighborhood Attention Transformer, CVPR 2023, ImageNet-1k classification table "
    "(224²; same figures in the official classification/NAT.md)"
)
DINAT_PAPER = (
    "Hassani & Shi, Dilated Neighborhood Attention Transformer, arXiv 2209.15001, ImageNet-1k classification table "
    "(224²; same figures in the official classification/DiNAT.md)"
)

_SIZES: dict[str, dict[str, Any]] = {
    "mini": dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2),
    "tiny": dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2),
    "small": dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3),
    "base": dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5),
}
_NAT_LAYER_SCALE = {"small": 1e-5, "base": 1e-5}  # nat.py: nat_small, nat_base
_DINAT_LAYER_SCALE = {"base": 1e-5}  # dinat.py: only dinat_base
_NAT_TABLE = {"mini": (20, 2.7, 81.8), "tiny": (28, 4.3, 83.2), "small": (51, 7.8, 83.7), "base": (90, 13.7, 84.3)}
_DINAT_TABLE = {"mini": (20, 2.7, 81.8), "tiny": (28, 4.3, 82.7), "small": (51, 7.8, 83.8), "base": (90, 13.7, 84.4)}


def dinat_dilations(depths: Sequence[int], img_size: int = 224, kernel_size: int = 7) -> list[list[int]]:
    """DiNAT's schedule: per level, NA (1) and DiNA layers alternate, DiNA using the largest dilation that fits the
    level's map (``map // kernel_size``: 8, 4, 2, 1 at 224² with 7×7 kernels)."""
    grid = conv_out(conv_out(img_size))
    out = []
    for i, depth in enumerate(depths):
        if i > 0:
            grid = conv_out(grid)
        dilated = max(1, grid // kernel_size)
        out.append([1 if j % 2 == 0 else dilated for j in range(depth)])
    return out


def _builder(size: str, dilated: bool):
    name = f"{'dinat' if dilated else 'nat'}_{size}"
    layer_scale = (_DINAT_LAYER_SCALE if dilated else _NAT_LAYER_SCALE).get(size)

    def build(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, **overrides: Any) -> NAT:
        config: dict[str, Any] = {**_SIZES[size], "layer_scale": layer_scale, **overrides}
        if dilated and "dilations" not in overrides:
            config["dilations"] = dinat_dilations(config["depths"], 224, config.get("kernel_size", 7))
        return NAT(**config, num_classes=num_classes, in_chans=in_chans, img_size=img_size, name=name)

    build.__name__ = name
    build.__doc__ = f"{'DiNAT' if dilated else 'NAT'}-{size.capitalize()} ({DINAT_PAPER if dilated else NAT_PAPER})."
    return name, build


for _size in _SIZES:
    for _dilated, _table, _paper in ((False, _NAT_TABLE, NAT_PAPER), (True, _DINAT_TABLE, DINAT_PAPER)):
        _name, _build = _builder(_size, _dilated)
        _params, _gmacs, _top1 = _table[_size]
        register_paper_model(
            _name,
            _build,
            PaperTable(_params, _gmacs, _top1, _paper),
            family="dinat" if _dilated else "nat",
            reference=REFERENCE,
        )
