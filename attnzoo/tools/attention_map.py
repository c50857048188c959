"""Attention weights of one query over a real photo, from a freshly built mechanism or a trained checkpoint.

Untrained: the photo is centre-cropped and resized to ``size·patch`` pixels, cut into ``patch × patch`` patches and
each patch embedded by one fixed random linear map (seeded) followed by per-token standardisation; the mechanism
(registry defaults, zero-initialised parameters randomised, see ``receptive.structural_copy``) runs on that
``size × size`` token map. Its weights then reflect the photo's content only through random projections.

Trained (``attnzoo.models.load(DIR)``): the photo is resized to the model's ``img_size``, turned into its input
channels (luminance for one channel) and standardised per image; the maps are those of the first block of the first
stage whose mixer is the mechanism, on that stage's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from ..models import load
from ..ops import record_attention
from .images import square_resize, to_channels
from .receptive import AttentionMap, maps_from_records, record_calls, structural_copy
from .workload import arrange_tokens, prepare

__all__ = ["PhotoAttention", "untrained_photo_attention", "trained_photo_attention", "DISPLAY_PIXELS"]

DISPLAY_PIXELS = 448


@dataclass
class PhotoAttention:
    """What ``attention_overlay_figure`` draws: the photo, the token grid, the query and the maps."""

    photo: np.ndarray
    grid: tuple[int, int]
    query: tuple[int, int]
    maps: list[AttentionMap]
    title: str


def _check_query(query: tuple[int, int] | None, grid: tuple[int, int]) -> tuple[int, int]:
    if query is None:
        return (grid[0] // 2, grid[1] // 2)
    if not all(0 <= q < g for q, g in zip(query, grid)):
        raise ValueError(f"--query {query[0]},{query[1]} is outside the {grid[0]}×{grid[1]} token grid")
    return query


def untrained_photo_attention(
    name: str,
    photo: np.ndarray,
    *,
    size: int = 16,
    dim: int = 32,
    patch: int = 8,
    query: tuple[int, int] | None = None,
    seed: int = 0,
) -> PhotoAttention:
    """Maps of ``name`` built fresh, on a ``size × size`` patch embedding of ``photo`` (module docstring)."""
    q = _check_query(query, (size, size))
    prepared = prepare(name, size, dim)
    module = structural_copy(prepared.module, seed=seed)
    pixels = torch.from_numpy(square_resize(photo, size * patch)).float()
    patches = rearrange(pixels, "(h p1) (w p2) c -> 1 h w (p1 p2 c)", p1=patch, p2=patch)
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(patches.shape[-1], dim, generator=gen) / patches.shape[-1] ** 0.5
    tokens = torch.nn.functional.layer_norm(patches @ embed, (dim,))
    maps = maps_from_records(record_calls(module, arrange_tokens(prepared.info, tokens)), size, q)
    title = f"{name} (untrained, random patch embedding): attention of token ({q[0]}, {q[1]})"
    return PhotoAttention(square_resize(photo, DISPLAY_PIXELS), (size, size), q, maps, title)


def trained_photo_attention(
    name: str, photo: np.ndarray, checkpoint: str | Path, *, query: tuple[int, int] | None = None
) -> PhotoAttention:
    """Maps of ``name`` inside the model trained in ``checkpoint`` (module docstring)."""
    try:
        model = load(checkpoint)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"--checkpoint {str(checkpoint)!r}: {exc}") from None
    config = getattr(model, "config", {}) or {}
    mixers = list(config.get("mixers", []))
    if name not in mixers:
        raise ValueError(f"the checkpoint's stages use mixers {mixers}; {name!r} is not one of them")
    stage = mixers.index(name)
    grid = tuple(model.grids[stage])
    q = _check_query(query, grid)
    img_size, in_chans = int(config.get("img_size", 28)), int(config.get("in_chans", 3))
    image = to_channels(square_resize(photo, img_size), in_chans)
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    if grid[0] != grid[1]:
        raise ValueError(f"stage {stage} has a non-square {grid[0]}×{grid[1]} grid; attention maps need a square one")
    first_block = model.stages[stage][0].mixer
    spans: list[int] = []  # record count before and after the first block's mixer runs
    with torch.no_grad(), record_attention() as records:
        hooks = [
            first_block.register_forward_pre_hook(lambda *_: spans.append(len(records))),
            first_block.register_forward_hook(lambda *_: spans.append(len(records))),
        ]
        try:
            model(x)
        finally:
            for hook in hooks:
                hook.remove()
    calls = records[spans[0] : spans[1]]
    maps = maps_from_records(calls, grid[0], q)
    title = (
        f"{name} in {Path(checkpoint).name} (stage {stage}, {grid[0]}×{grid[1]} tokens, block 1): "
        f"attention of token ({q[0]}, {q[1]})"
    )
    return PhotoAttention(square_resize(photo, DISPLAY_PIXELS), grid, q, maps, title)
