"""MAXIM's multi-axis gated MLP (block + grid gMLP) and its cross-gating block for two streams."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import normalize_axis_arg
from ._base import Mechanism, check_int, check_probability
from ._windows import pad_to_multiple
from .registry import register_mechanism


class SpatialDense(nn.Module):
    """A dense layer across tokens: inside each ``size`` block (``axis="block"``) or across the ``size`` grid of
    blocks, among tokens with the same offset in their block (``axis="grid"``). Extents that are not multiples of
    ``size`` are zero-padded at the end, so padded tokens add nothing to real ones (only the bias)."""

    def __init__(self, size: tuple[int, int], axis: str, bias_init: float) -> None:
        super().__init__()
        self.size, self.axis = size, axis
        tokens = size[0] * size[1]
        self.weight = nn.Parameter(torch.empty(tokens, tokens).normal_(std=0.02))  # MAXIM: N(0, 0.02²)
        self.bias = nn.Parameter(torch.full((tokens,), float(bias_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = pad_to_multiple(x.shape[1:3], self.size)
        padded = padding.pad(x)
        height, width = padding.padded_shape
        if self.axis == "block":
            grid = (height // self.size[0], width // self.size[1])
        else:
            grid = self.size
        fh, fw = height // grid[0], width // grid[1]
        blocks = rearrange(padded, "b (gh fh) (gw fw) c -> b (gh gw) (fh fw) c", fh=fh, fw=fw)
        if self.axis == "block":
            mixed = torch.einsum("bgtc,st->bgsc", blocks, self.weight) + self.bias[:, None]
        else:
            mixed = torch.einsum("btfc,st->bsfc", blocks, self.weight) + self.bias[:, None, None]
        out = rearrange(mixed, "b (gh gw) (fh fw) c -> b (gh fh) (gw fw) c", gh=grid[0], fh=fh)
        return padding.crop(out)


class GmlpLayer(nn.Module):
    """MAXIM's Block/GridGmlpLayer: x + Dense(u ⊙ (SpatialDense(LN(v)) + 1)), [u, v] = GELU(Dense(LN(x)))."""

    def __init__(self, channels: int, size: tuple[int, int], axis: str, factor: int, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.in_project = nn.Linear(channels, channels * factor)
        self.act = nn.GELU()
        self.intermediate_norm = nn.LayerNorm(channels * factor // 2, eps=1e-6)
        self.spatial = SpatialDense(size, axis, bias_init=0.0)
        self.out_project = nn.Linear(channels * factor // 2, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.act(self.in_project(self.norm(x))).chunk(2, dim=-1)
        gated = u * (self.spatial(self.intermediate_norm(v)) + 1.0)
        return x + self.drop(self.out_project(gated))


class MultiAxisGmlpLayer(nn.Module):
    """MAXIM's ResidualSplitHeadMultiAxisGmlpLayer without its shortcut: half the channels get grid gMLP, half
    block gMLP."""

    def __init__(self, dim: int, window: tuple[int, int], grid: tuple[int, int], factor: int, drop: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.in_project = nn.Linear(dim, dim * factor)
        self.act = nn.GELU()
        half = dim * factor // 2
        self.grid_gmlp = GmlpLayer(half, grid, "grid", factor, drop)
        self.block_gmlp = GmlpLayer(half, window, "block", factor, drop)
        self.out_project = nn.Linear(dim * factor, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.act(self.in_project(self.norm_in(x))).chunk(2, dim=-1)
        return self.drop(self.out_project(torch.cat([self.grid_gmlp(u), self.block_gmlp(v)], dim=-1)))


class SpatialGatingWeights(nn.Module):
    """MAXIM's GetSpatialGatingWeights: grid and block spatial dense layers on the two halves (biases start at 1)."""

    def __init__(self, dim: int, window: tuple[int, int], grid: tuple[int, int], factor: int, drop: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.in_project = nn.Linear(dim, dim * factor)
        self.act = nn.GELU()
        self.grid_dense = SpatialDense(grid, "grid", bias_init=1.0)
        self.block_dense = SpatialDense(window, "block", bias_init=1.0)
        self.out_project = nn.Linear(dim * factor, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.act(self.in_project(self.norm_in(x))).chunk(2, dim=-1)
        return self.drop(self.out_project(torch.cat([self.grid_dense(u), self.block_dense(v)], dim=-1)))


class CrossGatingBlock(nn.Module):
    """MAXIM's CrossGatingBlock (upsample_y=False): each stream is gated by the other's spatial gating weights;
    returns the x stream, out_x(x̃ ⊙ g_y) + y' + x₀ with y' = out_y(ỹ ⊙ g_x) + y₀ and x₀, y₀ the 1×1 projections."""

    def __init__(self, dim: int, window: tuple[int, int], grid: tuple[int, int], factor: int, drop: float) -> None:
        super().__init__()
        self.proj_x, self.proj_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_x, self.norm_y = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.in_project_x, self.in_project_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.gating_x = SpatialGatingWeights(dim, window, grid, factor, drop)
        self.gating_y = SpatialGatingWeights(dim, window, grid, factor, drop)
        self.out_project_x, self.out_project_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shortcut_x, shortcut_y = self.proj_x(x), self.proj_y(y)
        x = self.act(self.in_project_x(self.norm_x(shortcut_x)))
        y = self.act(self.in_project_y(self.norm_y(shortcut_y)))
        gate_x, gate_y = self.gating_x(x), self.gating_y(y)
        y = self.drop(self.out_project_y(y * gate_x)) + shortcut_y
        return self.drop(self.out_project_x(x * gate_y)) + y + shortcut_x


@register_mechanism(
    "multi_axis_gmlp",
    family="axial",
    paper="MAXIM: Multi-Axis MLP for Image Processing",
    year=2022,
    complexity="N·k",
    is_attention=False,
    receptive_field="local",
    reference="official google-research/maxim maxim/models/maxim.py::ResidualSplitHeadMultiAxisGmlpLayer, "
    "Block/GridGmlpLayer, GetSpatialGatingWeights, CrossGatingBlock (JAX; read)",
    note="Returns the multi-axis layer without its shortcut (attnzoo's block adds x). Extents that are not "
    "multiples of window_size / grid_size are zero-padded and padded tokens excluded from the spatial mixing "
    "(MAXIM pads the image instead). cross_gating=True is MAXIM's cross-gating block (CGB) as a mode of this "
    "mechanism: forward(x, context) with a context on the same grid, returning the x stream. It is not a separate "
    "'cross'-layout mechanism because it gates position by position (the context must share x's grid, whereas "
    "cross layouts take a context token set of any length) and it reuses the same block/grid spatial units. "
    "Output (i, j) depends on its block and on its grid lattice only: receptive_field='local'.",
    test_kwargs={"window_size": 4, "grid_size": 4},
    size_args={"window_size": "extent", "grid_size": "extent"},
)
class MultiAxisGmlp(Mechanism):
    """Multi-axis gated MLP (Tu et al., MAXIM, CVPR 2022).

    x is normalised and widened (Dense → GELU) and split in two: one half gets a grid gMLP (a spatial gating unit
    whose dense layer mixes the ``grid_size`` lattice of tokens spaced H/g apart: global, dilated mixing), the other
    a block gMLP (mixing the tokens of each ``window_size`` block: local mixing); each is x + Dense(u ⊙ (W·LN(v) + 1)).
    The halves are concatenated and projected back. ``cross_gating=True`` builds MAXIM's cross-gating block instead:
    x and a same-grid ``context`` y each produce multi-axis spatial gating weights that gate the other stream.

    Args:
        dim: channels.
        window_size: block side(s) of the block gMLP (8 in MAXIM's low-resolution stages, 16 in high-resolution ones).
        grid_size: grid side(s) of the grid gMLP (8 / 16).
        factor: width factor of the input projection and of each gMLP (2).
        proj_drop: dropout after the projections.
        cross_gating: build the cross-gating block (needs ``context`` in ``forward``).
    """

    def __init__(
        self,
        dim: int,
        *,
        window_size: int | Sequence[int] = 8,
        grid_size: int | Sequence[int] = 8,
        factor: int = 2,
        proj_drop: float = 0.0,
        cross_gating: bool = False,
    ) -> None:
        super().__init__(dim)
        self.window_size = normalize_axis_arg("window_size", window_size, 2, minimum=1)
        self.grid_size = normalize_axis_arg("grid_size", grid_size, 2, minimum=1)
        self.factor = check_int("factor", factor)
        if (dim * factor) % 4:
            raise ValueError(f"dim={dim} times factor={factor} must be divisible by 4 (two halves, each split in two)")
        self.cross_gating = bool(cross_gating)
        layer = CrossGatingBlock if self.cross_gating else MultiAxisGmlpLayer
        drop = check_probability("proj_drop", proj_drop)
        self.layer = layer(dim, self.window_size, self.grid_size, factor, drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        if not self.cross_gating:
            if context is not None:
                raise ValueError("context is only taken with cross_gating=True")
            return self.layer(x)
        if context is None or not isinstance(context, torch.Tensor) or context.shape != x.shape:
            shape = None if not isinstance(context, torch.Tensor) else tuple(context.shape)
            raise ValueError(f"cross_gating=True needs context of x's shape {tuple(x.shape)}, got {shape}")
        return self.layer(x, context)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, grid_size={self.grid_size}, factor={self.factor}, "
            f"cross_gating={self.cross_gating}"
        )
