"""Halo-tiled neighborhood attention in plain PyTorch: any device, any float dtype, autograd, no N×N tensor.

Queries are grouped per axis into tiles of consecutive sub-lattice positions; a tile's keys are the union of its
queries' windows (the tile plus its halo). Per tile one small dense attention with the exact per-axis masks
combined by outer product. Memory is O(N·C) where C is the halo volume, i.e. linear in the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..geometry import axis_windows, combine_axes
from ..problem import NAProblem
from .base import Backend, compute_dtype, softmax_with_lse


@dataclass(frozen=True)
class AxisTiles:
    query_index: torch.Tensor  # [T, a] query coordinates (padded by repeating the tile's last query)
    key_index: torch.Tensor  # [T, c] key coordinates
    mask: torch.Tensor  # [T, a, c] key c is in the window of query a
    rel: torch.Tensor  # [T, a, c] relative-position index along the axis (0 where masked)
    inverse: torch.Tensor  # [L] flat slot t*a + i of each query coordinate
    rel_size: int


def _tile_length(kernel: int, stride: int) -> int:
    """Queries per tile along an axis: whole stride groups, about 8 positions."""
    return stride * max(1, round(8 / stride)) if stride < 8 else stride


@lru_cache(maxsize=256)
def axis_tiles(extent: int, kernel: int, stride: int, dilation: int, causal: bool) -> AxisTiles:
    w = axis_windows(extent, kernel, stride, dilation, causal)
    a = min(_tile_length(kernel, stride), -(-extent // dilation))
    tiles: list[list[int]] = []
    for r in range(dilation):
        lattice = list(range(r, extent, dilation))
        tiles += [lattice[i : i + a] for i in range(0, len(lattice), a)]
    spans = []
    for tile in tiles:
        first = min(int(w.start[x]) for x in tile)
        last = max(int(w.start[x]) + dilation * (int(w.count[x]) - 1) for x in tile)
        spans.append((first, last))
    c = max((last - first) // dilation + 1 for first, last in spans)
    q_index = torch.tensor([tile + [tile[-1]] * (a - len(tile)) for tile in tiles])
    k_index = []
    for first, last in spans:
        keys = list(range(first, last + 1, dilation))
        k_index.append(keys + [keys[-1]] * (c - len(keys)))
    k_index = torch.tensor(k_index)
    offset = k_index[:, None, :] - w.start[q_index][:, :, None]
    steps = offset.div(dilation, rounding_mode="floor")
    mask = (offset >= 0) & (offset % dilation == 0) & (steps < w.count[q_index][:, :, None])
    # keys duplicated as padding must not be counted twice
    first_occurrence = torch.ones_like(k_index, dtype=torch.bool)
    first_occurrence[:, 1:] = k_index[:, 1:] != k_index[:, :-1]
    mask &= first_occurrence[:, None, :]
    rel = torch.where(mask, w.rel_start[q_index][:, :, None] + steps, torch.zeros_like(steps))
    inverse = torch.empty(extent, dtype=torch.long)
    for t, tile in enumerate(tiles):
        for i, x in enumerate(tile):
            inverse[x] = t * a + i
    return AxisTiles(q_index, k_index, mask, rel, inverse, 2 * kernel - 1)


def _gather_tiles(x: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
    """[B, *L, h, d] -> [B, h, T, A, d] by gathering tile coordinates along every spatial axis."""
    rank = len(index)
    for axis, idx in enumerate(index):
        x = x.index_select(1 + axis, idx.flatten())
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    sizes = [s for idx in index for s in idx.shape]
    x = x.reshape(b, *sizes, h, d)
    tiles = [1 + 2 * i for i in range(rank)]
    within = [2 + 2 * i for i in range(rank)]
    x = x.permute(0, 2 * rank + 1, *tiles, *within, 2 * rank + 2)
    n_tiles = 1
    n_within = 1
    for idx in index:
        n_tiles *= idx.shape[0]
        n_within *= idx.shape[1]
    return x.reshape(b, h, n_tiles, n_within, d)


def _scatter_tiles(y: torch.Tensor, plans: list[AxisTiles]) -> torch.Tensor:
    """[B, h, T, A, d] -> [B, *L, h, d], keeping each query's own slot (inverse of ``_gather_tiles``)."""
    rank = len(plans)
    b, h, d = y.shape[0], y.shape[1], y.shape[-1]
    counts = [p.query_index.shape[0] for p in plans]
    within = [p.query_index.shape[1] for p in plans]
    y = y.reshape(b, h, *counts, *within, d)
    order = [0]
    for i in range(rank):
        order += [2 + i, 2 + rank + i]
    order += [1, 2 + 2 * rank]
    y = y.permute(*order).reshape(b, *(c * w for c, w in zip(counts, within)), h, d)
    for axis, p in enumerate(plans):
        y = y.index_select(1 + axis, p.inverse.to(y.device))
    return y


class TiledBackend(Backend):
    name = "tiled"
    description = "halo-tiled attention in plain PyTorch (any device and float dtype, autograd, O(N) memory)"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        return []

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        p = problem
        plans = [axis_tiles(*args) for args in zip(p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal)]
        device = q.device
        ct = compute_dtype(q.dtype)
        q_idx = [pl.query_index.to(device) for pl in plans]
        k_idx = [pl.key_index.to(device) for pl in plans]
        qt = _gather_tiles(q.to(ct), q_idx)  # [B, h, T, A, d]
        kt = _gather_tiles(k.to(ct), k_idx)  # [B, h, T, C, d]
        vt = _gather_tiles(v.to(ct), k_idx)
        mask = combine_axes([pl.mask for pl in plans], torch.logical_and).to(device)  # [T, A, C]
        scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if rel_pos_bias is not None:
            index = plans[0].rel
            for pl in plans[1:]:  # row-major over axes, as the [heads, *(2k-1)] table is laid out
                index = combine_axes([index, pl.rel], lambda outer, inner, size=pl.rel_size: outer * size + inner)
            index = index.to(device)
            scores = scores + rel_pos_bias.to(ct).reshape(p.heads, -1)[:, index].unsqueeze(0)
        if key_bias is not None:
            kb = key_bias.expand(p.batch, *p.spatial_shape, p.heads).to(ct).unsqueeze(-1)
            scores = scores + _gather_tiles(kb, k_idx).transpose(-1, -2)  # [B, h, T, 1, C]
        scores = scores.masked_fill(~mask, float("-inf"))
        if additional_keys is not None:
            ak = additional_keys.to(ct).permute(0, 2, 1, 3).unsqueeze(2)  # [B, h, 1, n, d]
            av = additional_values.to(ct).permute(0, 2, 1, 3).unsqueeze(2)
            extra = torch.matmul(qt, ak.transpose(-1, -2)) * scale  # [B, h, T, A, n]
            scores = torch.cat([scores, extra], dim=-1)
            vt = torch.cat([vt, av.expand(-1, -1, vt.shape[2], -1, -1)], dim=-2)
        weights, lse = softmax_with_lse(scores)
        out = torch.matmul(weights, vt)
        out = _scatter_tiles(out, plans).to(q.dtype)
        lse_out = _scatter_tiles(lse.unsqueeze(-1), plans).squeeze(-1) if p.return_lse else None
        return out, lse_out
