"""Hierarchical vision backbone with a pluggable token mixer per stage.

Layout: a conv stem turns the image into channels-last tokens ``(B, H, W, C)``; each stage is a stack of pre-norm
blocks ``x + mixer(norm(x))``, ``x + mlp(norm(x))`` (``mlp``: the MLP, or a ``slot="channel"`` mechanism named in
``channel_mixers``); a strided 3×3 conv halves the token grid between stages (``ceil(H / 2)``); the head is norm → global average pool → linear. Any registered mechanism can be the mixer of any
stage (``attnzoo.list_mechanisms()``).

Sizes (``SIZES``):

=========  =================  ============  ===========  ===========  =================================
size       dims               depths        stem stride  mlp ratio    tokens per stage at img_size
=========  =================  ============  ===========  ===========  =================================
``tiny``   32, 64, 128, 256   1, 1, 2, 1    2            2            14, 7, 4, 2  (img_size 28)
``small``  64, 128, 256, 512  2, 2, 6, 2    4            4            56, 28, 14, 7 (img_size 224)
=========  =================  ============  ===========  ===========  =================================

Per-stage defaults: a mechanism's own defaults are kept, except that the spatial sizes its registry entry declares
(``size_args``: ``kernel_size``, ``window_size``, ``sr_ratio``, ``num_windows``…, see ``docs/vocabulary.md``) larger
than the stage's token grid are clamped to the grid (so NA's 7×7 kernel becomes 4×4 on a 4×4 stage and MaxViT's 7×7
partition 2×2 on a 2×2 stage), and a ``shift_size`` is halved with the window (0 when the window covers the whole
grid). Mechanisms that need a fixed resolution (``needs_input_size`` or an ``input_resolution``
argument) receive ``input_resolution=(H, W)``. Sequence-layout mechanisms receive flattened tokens ``(B, H·W, C)``.
Arguments given by the user are never changed; a mechanism that cannot run at a stage's size raises a ``ValueError``
at construction that names the stage, mixer, size and arguments.

State between blocks: a mechanism that declares ``uses_block_state`` (e.g. ``forward_cross``) receives one
``BlockState`` per stage and forward pass, shared by the blocks of that stage in order (``Stage``); the others are
called as ``mixer(x)``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..mechanisms import create as create_mechanism
from ..mechanisms import mechanism_info
from ..mechanisms._base import BlockState, Mechanism, flatten_tokens
from ..mechanisms.registry import SIZE_RULES

__all__ = ["BackboneSize", "SIZES", "Backbone", "Block", "MixerAdapter", "Stage", "stage_defaults"]


@dataclass(frozen=True)
class BackboneSize:
    """Widths, depths and stem of one named backbone size."""

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    stem_stride: int
    mlp_ratio: float
    img_size: int

    @property
    def num_stages(self) -> int:
        return len(self.dims)


SIZES: dict[str, BackboneSize] = {
    "tiny": BackboneSize(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), stem_stride=2, mlp_ratio=2.0, img_size=28),
    "small": BackboneSize(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), stem_stride=4, mlp_ratio=4.0, img_size=224),
}


def _clamp(value: Any, grid: tuple[int, int], odd: bool) -> Any:
    def fit(v: int, extent: int) -> int:
        if v <= extent:
            return v
        return extent - 1 + extent % 2 if odd and v % 2 else extent

    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return fit(value, min(grid))
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        if len(value) == len(grid):  # one size per axis
            return tuple(fit(v, g) for v, g in zip(value, grid))
        return tuple(fit(v, min(grid)) for v in value)  # one size per head group
    return value


def _largest_rate(value: Any) -> int:
    """The largest int in a dilation argument (an int, one per axis, or one per head group), 1 for None."""
    if isinstance(value, (tuple, list)):
        return max((_largest_rate(v) for v in value), default=1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _fitted(
    params: Mapping[str, inspect.Parameter],
    size_args: Mapping[str, str],
    grid: tuple[int, int],
    user: Mapping[str, Any],
    odd: bool,
    bounded: tuple[str, ...] = SIZE_RULES,
) -> dict[str, Any]:
    """The defaults of the declared ``size_args`` whose rule is in ``bounded``, fitted to ``grid`` (those that
    change; ``odd``: a ``"kernel"``/``"span"`` with an odd default stays odd), and ``shift_size`` with the window."""
    kwargs: dict[str, Any] = {}
    for arg, rule in size_args.items():
        p = params.get(arg)
        if p is None or arg in user or p.default is inspect.Parameter.empty or rule not in bounded:
            continue
        limit = grid
        if rule == "dilation":  # a neighbourhood of at least 2 taps must fit: 2·rate at most the side
            limit = (max(1, grid[0] // 2), max(1, grid[1] // 2))
        if rule == "span":  # kernel_size taps dilation apart: kernel_size·dilation must fit
            dilation = params["dilation"].default if "dilation" in params else 1
            rate = _largest_rate(user.get("dilation", kwargs.get("dilation", dilation)))
            limit = (max(1, grid[0] // rate), max(1, grid[1] // rate))
        fitted = _clamp(p.default, limit, odd and rule in ("kernel", "span"))
        if fitted != p.default and not (isinstance(p.default, list) and tuple(p.default) == fitted):
            kwargs[arg] = fitted
    shift, window = params.get("shift_size"), kwargs.get("window_size")
    if window is not None and shift is not None and "shift_size" not in user:
        if isinstance(shift.default, int) and not isinstance(shift.default, bool) and shift.default > 0:
            w = min(window) if isinstance(window, tuple) else window
            kwargs["shift_size"] = 0 if w >= min(grid) else min(shift.default, w // 2)
    return kwargs


def stage_defaults(name: str, grid: tuple[int, int], user_kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Candidate keyword arguments for mechanism ``name`` on a ``grid`` token map, preferred first.

    Each is ``user_kwargs`` plus the defaults of the mechanism's declared ``size_args`` (``docs/vocabulary.md``)
    fitted to the grid: clamped to the grid's side; then (for mechanisms that need centred kernels) with an odd
    kernel clamped to the largest odd size; last, with windows and kernels at their defaults and only ratios and
    counts fitted (for a mechanism whose own rule is not a plain bound: a window it pads, a kernel of at least 3
    that zero padding makes work on a 2×2 grid).
    """
    info = mechanism_info(name)
    params = inspect.signature(info.cls.__init__).parameters
    extra: dict[str, Any] = {}
    if "input_resolution" not in user_kwargs and (info.needs_input_size or "input_resolution" in params):
        extra["input_resolution"] = tuple(grid)
    fits = [_fitted(params, info.size_args, grid, user_kwargs, odd) for odd in (False, True)]
    fits.append(_fitted(params, info.size_args, grid, user_kwargs, False, bounded=("ratio", "count")))
    candidates: list[dict[str, Any]] = []
    for fitted in fits:
        kwargs = {**fitted, **extra, **user_kwargs}
        if kwargs not in candidates:
            candidates.append(kwargs)
    return candidates


class MixerAdapter(nn.Module):
    """Runs any registered mechanism on channels-last ``(B, H, W, C)`` tokens, flattening for sequence layouts."""

    def __init__(self, name: str, dim: int, **kwargs: Any) -> None:
        super().__init__()
        self.name = name
        self.flatten = mechanism_info(name).layout == "sequence"
        self.mixer = create_mechanism(name, dim, **kwargs)
        self.uses_block_state = bool(getattr(self.mixer, "uses_block_state", False))

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> torch.Tensor:
        extra = {"state": state} if self.uses_block_state else {}
        if not self.flatten:
            return self.mixer(x, **extra)
        return self.mixer(flatten_tokens(x), **extra).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def check_slot(argument: str, name: str, slot: str) -> None:
    """Raise a ValueError unless mechanism ``name`` (given as ``argument``) fills a block's ``slot``."""
    actual = mechanism_info(name).slot
    if actual != slot:
        other = "mixers" if actual == "token" else "channel_mixer"
        raise ValueError(
            f"{argument}={name!r} is a {actual} mixer (slot={actual!r}) but this place takes a {slot} mixer "
            f"(slot={slot!r}); pass it as {other}= instead"
        )


class Block(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` on ``(B, H, W, C)``.

    ``channel_mixer``: a registered ``slot="channel"`` mechanism that replaces the MLP (``None``: the MLP); it gets
    ``mlp_ratio`` when it takes one and ``channel_kwargs`` does not set it.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        mlp_ratio: float,
        mixer_kwargs: Mapping[str, Any],
        channel_mixer: str | None = None,
        channel_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_slot("mixer", name, "token")
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = MixerAdapter(name, dim, **mixer_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        if channel_mixer is None:
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        else:
            check_slot("channel_mixer", channel_mixer, "channel")
            kwargs = dict(channel_kwargs or {})
            if "mlp_ratio" in inspect.signature(mechanism_info(channel_mixer).cls.__init__).parameters:
                kwargs.setdefault("mlp_ratio", mlp_ratio)
            self.mlp = MixerAdapter(channel_mixer, dim, **kwargs)

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


class Stage(nn.Sequential):
    """The blocks of one stage, run in order with one fresh ``BlockState`` per forward pass; ``mixer_kwargs``: the
    arguments its mixers were built with (the declared sizes fitted to the stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = BlockState()
        for block in self:
            x = block(x, state)
        return x


class Downsample(nn.Module):
    """Strided 3×3 conv on channels-last tokens: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)``, then norm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Stem(nn.Module):
    """Conv stem: image ``(B, C, H, W)`` -> tokens ``(B, H/stride, W/stride, dim)`` (stride 2: one conv, 4: two)."""

    def __init__(self, in_chans: int, dim: int, stride: int) -> None:
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"stem_stride={stride} must be 2 or 4")
        layers: list[nn.Module] = [nn.Conv2d(in_chans, dim // 2 if stride == 4 else dim, 3, stride=2, padding=1)]
        if stride == 4:
            layers += [nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)]
        self.proj = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _halve(n: int) -> int:
    return (n + 1) // 2


class Backbone(nn.Module):
    """Hierarchical backbone; ``mixers`` names one registered mechanism per stage (see module docstring)."""

    def __init__(
        self,
        mixers: Sequence[str],
        *,
        dims: Sequence[int],
        depths: Sequence[int],
        stem_stride: int = 2,
        mlp_ratio: float = 2.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        mixer_kwargs: Sequence[Mapping[str, Any]] | None = None,
        channel_mixers: Sequence[str | None] | None = None,
        channel_kwargs: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        super().__init__()
        stages = len(dims)
        channel_mixers = list(channel_mixers) if channel_mixers is not None else [None] * stages
        if len(depths) != stages or len(mixers) != stages or len(channel_mixers) != stages:
            raise ValueError(
                f"dims={tuple(dims)}, depths={tuple(depths)}, mixers={tuple(mixers)} and "
                f"channel_mixers={tuple(channel_mixers)} must have equal length"
            )
        for i, (name, channel) in enumerate(zip(mixers, channel_mixers)):
            check_slot(f"mixers[{i}]", name, "token")
            if channel is not None:
                check_slot(f"channel_mixers[{i}]", channel, "channel")
        per_channel = list(channel_kwargs) if channel_kwargs is not None else [{}] * stages
        for name, value, minimum in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1)):
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
        size = (
            (img_size, img_size)
            if _is_int(img_size)
            else tuple(img_size)
            if isinstance(img_size, (tuple, list))
            else ()
        )
        if len(size) != 2 or not all(_is_int(s) and s >= stem_stride for s in size):
            raise ValueError(f"img_size={img_size!r} must be one or two ints ≥ stem_stride={stem_stride}")
        per_stage = list(mixer_kwargs) if mixer_kwargs is not None else [{}] * stages
        if len(per_stage) != stages or not all(k is None or isinstance(k, Mapping) for k in per_stage):
            raise ValueError(f"mixer_kwargs={mixer_kwargs!r} must be None or {stages} dicts (one per stage)")
        for k in per_stage:
            if k is not None and not all(isinstance(key, str) for key in k):
                raise ValueError(f"mixer_kwargs={mixer_kwargs!r} must have argument names (str) as keys")
        self.in_chans = in_chans
        self.img_size = size
        self.num_classes = num_classes
        self.dims = tuple(dims)
        self.stem = Stem(in_chans, dims[0], stem_stride)
        grid = (math.ceil(size[0] / stem_stride), math.ceil(size[1] / stem_stride))
        self.grids: list[tuple[int, int]] = []
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, (name, dim, depth) in enumerate(zip(mixers, dims, depths)):
            if i > 0:
                self.downsamples.append(Downsample(dims[i - 1], dim))
                grid = (_halve(grid[0]), _halve(grid[1]))
            self.grids.append(grid)
            channel = (channel_mixers[i], per_channel[i] or {})
            self.stages.append(self._build_stage(i, name, dim, depth, grid, mlp_ratio, per_stage[i] or {}, channel))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _build_stage(
        i: int,
        name: str,
        dim: int,
        depth: int,
        grid: tuple[int, int],
        mlp_ratio: float,
        user: Mapping[str, Any],
        channel: tuple[str | None, Mapping[str, Any]] = (None, {}),
    ) -> Stage:
        where = f"stage {i} ({grid[0]}×{grid[1]} tokens, dim {dim})"
        try:
            candidates = stage_defaults(name, grid, user)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        first_error: tuple[dict[str, Any], Exception] | None = None
        for kwargs in candidates:
            try:
                return Backbone._try_stage(name, dim, depth, grid, mlp_ratio, kwargs, channel)
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
                first_error = first_error or (kwargs, exc)
        kwargs, exc = first_error  # type: ignore[misc]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{where}: mixer {name!r} with {kwargs} cannot run on this stage: {reason}") from exc

    @staticmethod
    def _try_stage(
        name: str,
        dim: int,
        depth: int,
        grid: tuple[int, int],
        mlp_ratio: float,
        kwargs: Mapping[str, Any],
        channel: tuple[str | None, Mapping[str, Any]] = (None, {}),
    ) -> Stage:
        """Build the stage and run its first mixer once on a zero map, so size problems surface now."""
        blocks = Stage(*(Block(name, dim, mlp_ratio, kwargs, *channel) for _ in range(depth)))
        blocks.mixer_kwargs = dict(kwargs)  # what the stage's mixers were built with (sizes fitted to the grid)
        probe = torch.zeros(1, *grid, dim)
        with torch.no_grad():
            out = blocks[0].mixer.eval()(probe)
        blocks[0].mixer.train()
        if tuple(out.shape) != tuple(probe.shape):
            raise ValueError(
                f"it returns shape {tuple(out.shape)} for input {tuple(probe.shape)}; blocks need equal shapes"
            )
        return blocks

    def check_image(self, x: torch.Tensor) -> None:
        """An image batch ``(B, in_chans, H, W)`` in the model's dtype and device, or an error that says what differs."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images (B, {self.in_chans}, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x.shape={tuple(x.shape)} must be (batch, in_chans={self.in_chans}, height, width)")
        if x.numel() == 0:
            raise ValueError(f"x.shape={tuple(x.shape)} is empty: batch, height and width must be >= 1")
        weight = self.stem.proj[0].weight
        if not x.is_floating_point():
            raise TypeError(
                f"x.dtype={x.dtype} must be floating point (normalised images), like the model ({weight.dtype})"
            )
        if x.dtype != weight.dtype:
            raise TypeError(
                f"x.dtype={x.dtype} differs from the model's {weight.dtype}: convert one (model.to({x.dtype}) or x.to({weight.dtype}))"
            )
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage feature maps, channels-last ``(B, H_i, W_i, C_i)``, for dense tasks."""
        self.check_image(x)
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the ``aux_loss()`` of every mechanism after the last training-mode forward (``None`` when none has
        one): what the training loop adds to the classification loss."""
        losses = [loss for m in self.modules() if isinstance(m, Mechanism) and (loss := m.aux_loss()) is not None]
        return torch.stack([loss.sum() for loss in losses]).sum() if losses else None
