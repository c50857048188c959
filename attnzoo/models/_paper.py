"""Published backbones by name: the registry of paper configurations, their shared model skeleton, and measuring.

A family file (``nat.py``, ``van.py``, …) builds its model class on ``PaperModel`` and registers each published
configuration with ``register_paper_model(name, builder, PaperTable(...))``. ``attnzoo.models.create`` builds them,
``model_info`` returns the paper's table next to the figures measured on the model itself (``measure``).

Counting convention (``measure``): parameters are every parameter of the model with a 1000-class head; MACs are half
the FLOPs that ``torch.utils.flop_counter`` counts for one 224² image (``attnzoo.ops.count_flops``: matmuls,
linears, convolutions and, through the engine's registered formulas, the fused neighborhood-attention op), the
convention of the papers' fvcore / mmcv counters (norms, activations, softmax and pooling are not counted).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..ops import count_flops

__all__ = [
    "PaperTable",
    "PaperModelSpec",
    "PaperModel",
    "Stage",
    "DropPath",
    "Mlp",
    "in_stage",
    "init_transformer_weights",
    "init_fan_out_weights",
    "PatchEmbed",
    "Measured",
    "PAPER_MODELS",
    "register_paper_model",
    "paper_spec",
    "measure",
    "conv_out",
    "check_heads",
    "check_kernel_fits",
    "drop_path_rates",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PaperTable:
    """One row of a paper's ImageNet-1k table: parameters (millions), MACs at 224² (G; papers call them FLOPs), top-1."""

    params_m: float
    gmacs: float
    top1: float
    source: str  # paper, venue/year and which table, e.g. "Hassani et al., Neighborhood Attention Transformer, CVPR 2023, …"


@dataclass(frozen=True)
class PaperModelSpec:
    """A registered published configuration: how to build it and what its paper reports."""

    name: str
    family: str
    builder: Callable[..., PaperModel]
    table: PaperTable
    reference: str  # official code the definition was read from
    note: str = ""  # known, measured differences from the paper's figures and why
    documented_params_error: float | None = None  # relative parameter difference explained in ``note`` (None: none)
    documented_macs_error: float | None = None  # relative MAC difference explained in ``note`` (None: none)


PAPER_MODELS: dict[str, PaperModelSpec] = {}


def register_paper_model(
    name: str,
    builder: Callable[..., PaperModel],
    table: PaperTable,
    *,
    family: str,
    reference: str,
    note: str = "",
    documented_params_error: float | None = None,
    documented_macs_error: float | None = None,
) -> None:
    """Register a published configuration. A figure that cannot be matched (parameters within 1 %, MACs within 3 %)
    is documented: ``note`` says why and ``documented_*_error`` pins the measured relative difference (rounded to
    0.01 %; the tests check that it stays exactly that)."""
    if name in PAPER_MODELS:
        raise ValueError(f"paper model {name!r} is registered twice")
    if (documented_params_error is not None or documented_macs_error is not None) and not note:
        raise ValueError(f"{name}: a documented difference needs a note that explains it")
    PAPER_MODELS[name] = PaperModelSpec(
        name, family, builder, table, reference, note, documented_params_error, documented_macs_error
    )


def paper_spec(name: str, known: Sequence[str]) -> PaperModelSpec:
    """The spec of ``name``, or a ValueError that suggests the closest of ``known`` names."""
    if name in PAPER_MODELS:
        return PAPER_MODELS[name]
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"name={name!r} is not a known model{hint} (attnzoo.models.list_models() lists all)")


def conv_out(size: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    """Output length of a convolution (the map size after a strided stem or downsampling conv)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_per_stage(levels: int, source: str, **per_stage: Sequence[Any]) -> None:
    """Every ``per_stage`` argument has one entry per stage (``levels`` of them, counted from ``source``)."""
    for arg, value in per_stage.items():
        if len(value) != levels:
            raise ValueError(f"{arg}={list(value)!r} must have one entry per stage ({levels}, from {source})")


def halve_grid(stage: int, grid: int, what: str, img_size: int) -> int:
    """The token map side after a 2× downsampling between ``stage`` and the next; an odd map is refused."""
    if grid % 2:
        raise ValueError(f"stage {stage} ({grid}×{grid} tokens): {what} needs an even map; img_size={img_size}")
    return grid // 2


def check_heads(stage: int, dim: int, num_heads: int) -> None:
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"stage {stage}: num_heads={num_heads!r} must be a positive int that divides the width {dim}")


def check_kernel_fits(
    stage: int, grid: tuple[int, int], kernel_size: int, dilation: int = 1, arg: str = "kernel_size"
) -> None:
    """A neighborhood of ``kernel_size`` at ``dilation`` must fit the stage's token map (NATTEN's rule)."""
    if kernel_size * dilation > min(grid):
        raise ValueError(
            f"stage {stage} ({grid[0]}×{grid[1]} tokens): {arg}={kernel_size} with dilation {dilation} spans "
            f"{kernel_size * dilation} tokens, more than the map; kernel_size·dilation must be ≤ {min(grid)}"
        )


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over all blocks, split per stage."""
    total = sum(depths)
    rates = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., Deep Networks with Stochastic Depth, 2016): drop a residual branch per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` on channels-last tokens (the transformer MLP of NAT, CSWin, …)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@contextlib.contextmanager
def in_stage(stage: int):
    """Prefix a ValueError/TypeError raised while building stage ``stage`` with the stage's number."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if str(exc).startswith("stage "):
            raise
        raise type(exc)(f"stage {stage}: {exc}") from None


def init_transformer_weights(m: nn.Module) -> None:
    """Linear weights truncated normal (std 0.02), linear biases 0, LayerNorm 1 / 0 (NAT, CSWin, … official code)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_fan_out_weights(m: nn.Module) -> None:
    """The VAN / SMT official initialisation: linear truncated normal (std 0.02); conv normal with std
    √(2 / fan_out); biases 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """4×4 stride-4 convolution and LayerNorm: image → ``(B, H/4, W/4, dim)`` (Swin's patch embedding, used by
    Agent-Swin and LITv2)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """One resolution level: an optional downsampling module, then ``blocks`` in sequence."""

    def __init__(self, downsample: nn.Module | None, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class PaperModel(nn.Module):
    """Skeleton shared by the published backbones: ``stem`` → ``stages`` → ``norm`` → global mean pool → ``head``.

    Stage outputs are channels-last ``(B, H, W, C)`` (``channels_last = True``) or ``(B, C, H, W)``. The timm model
    API is provided: ``forward_features`` (final normalised map, the model's layout), ``forward_head``,
    ``reset_classifier``, ``get_classifier``, ``forward_intermediates`` (one ``(B, C, H, W)`` map per stage, what
    timm's ``features_only`` wrapper uses), ``feature_info`` and ``pretrained_cfg``.
    """

    channels_last = True
    norm_after_pool = False  # ConvNeXt-style heads (HorNet): pool the last map, then normalise the pooled vector

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        dims: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        norm: nn.Module,
        *,
        name: str,
        in_chans: int,
        img_size: int,
        crop_pct: float = 0.875,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.norm = norm
        self.num_features = self.head_hidden_size = dims[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": d, "reduction": r, "module": f"stages.{i}"} for i, (d, r) in enumerate(zip(dims, reductions))
        ]
        self.pretrained_cfg = self.default_cfg = {
            "architecture": name,
            "tag": "",
            "url": "",
            "hf_hub_id": None,
            "num_classes": num_classes,
            "input_size": (in_chans, img_size, img_size),
            "pool_size": (img_size // reductions[-1],) * 2,
            "crop_pct": crop_pct,
            "interpolation": "bicubic",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": self.first_conv_name(),
            "classifier": "head",
        }

    def first_conv_name(self) -> str:
        return next(name for name, m in self.named_modules() if isinstance(m, nn.Conv2d))

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_pool:
            return x
        if self.channels_last or isinstance(self.norm, nn.Identity):
            return self.norm(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2) if self.channels_last else (2, 3))
        if self.norm_after_pool:
            x = self.norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: these models pool by global average ('avg') only")
        self.num_classes = num_classes
        ref = self.norm.weight if getattr(self.norm, "weight", None) is not None else None
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head = head.to(ref.device, ref.dtype) if ref is not None else head

    def stage_outputs(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """One ``(B, C_i, H_i, W_i)`` map per stage in ``indices`` (all stages by default), for dense prediction."""
        return self.forward_intermediates(
            x, indices=list(indices) if indices is not None else None, intermediates_only=True
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: stage maps at ``indices`` (an int n = the last n stages; negative indices count back)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take = _take_indices(len(self.stages), indices)
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                out = self._final_norm(x) if norm and i == len(self.stages) - 1 else x
                intermediates.append(self._to_nchw(out).contiguous())
        if intermediates_only:
            return intermediates
        return self._final_norm(x), intermediates


def _take_indices(stages: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(stages))
    if isinstance(indices, int):
        if not 0 < indices <= stages:
            raise ValueError(f"indices={indices} must be 1..{stages} (the last n stages)")
        return list(range(stages - indices, stages))
    take = []
    for i in indices:
        if not -stages <= i < stages:
            raise ValueError(f"indices={list(indices)}: index {i} is outside the {stages} stages")
        take.append(i % stages)
    return take


@dataclass(frozen=True)
class Measured:
    """Figures measured on a built model (see the module docstring for the convention)."""

    params: int
    macs: int


def _count_macs(model: nn.Module, in_chans: int, img_size: int) -> int:
    """MACs of one image through ``model`` (built on the meta device), run on fake CPU tensors: no memory, no compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.eval()
        x = torch.empty(1, in_chans, img_size, img_size)
        with torch.no_grad():
            flops = count_flops(lambda: model(x))
    return flops // 2


@functools.cache
def measure(name: str, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000) -> Measured:
    """Parameters and MACs of the published configuration ``name`` (built on the meta device, counted on fake tensors)."""
    spec = PAPER_MODELS[name]
    with torch.device("meta"):
        model = spec.builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    params = sum(p.numel() for p in model.parameters())
    return Measured(params=params, macs=_count_macs(model, in_chans, img_size))
