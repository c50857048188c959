"""Build a registered mechanism and an input for it at a requested token grid, whatever its layout.

Inputs per layout (the token count is always ``size·size`` for a square ``size``):

- ``spatial``: ``(B, size, size, C)``; a mechanism with ``native_rank`` 1 gets ``(B, size·size, C)``, one with
  ``native_rank`` 3 gets ``(B, 4, size/2, size/2, C)`` (4 frames, same token count; ``size`` must be even).
- ``sequence``: ``(B, size·size, C)``, the grid flattened row-major.
- ``cross``: ``(x, context)`` with ``x`` as for ``spatial`` and ``context = x`` flattened to ``(B, N, C)`` (the image
  attends to itself, so costs compare with self-attention and gradients flow through both arguments).

``prepare`` builds with the registry defaults (plus ``input_resolution`` for mechanisms that take one) and, when the
defaults cannot take the workload, falls back to the registry's test configuration (``test_kwargs``) at the same
size and width: first one of its arguments at a time (the smallest change from the paper's defaults), then all of
them; the chosen configuration is reported in ``Prepared.note``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..mechanisms import create, mechanism_info
from ..mechanisms.registry import MechanismInfo

__all__ = [
    "Prepared",
    "PrepareError",
    "token_grid",
    "layout_inputs",
    "make_inputs",
    "arrange_tokens",
    "build",
    "prepare",
    "output_token_index",
]


class PrepareError(Exception):
    """The mechanism could not be built or run at the workload; the message says why."""


@dataclass
class Prepared:
    """A built mechanism (eval mode), the kwargs it was built with, and a note on any adjustment."""

    name: str
    info: MechanismInfo
    module: nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def token_grid(info: MechanismInfo, size: int) -> tuple[int, ...]:
    """The spatial shape the mechanism is fed for a ``size × size`` workload (see the module docstring)."""
    if info.layout == "sequence" or (info.layout == "spatial" and info.native_rank == 1):
        return (size * size,)
    if info.native_rank == 3 and info.layout == "spatial":
        if size % 2:
            raise ValueError(f"size={size} must be even for the 3-D mechanism {info.name!r} (4 frames of size/2)")
        return (4, size // 2, size // 2)
    return (size, size)


def layout_inputs(info: MechanismInfo, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The arguments ``info``'s layout takes for the input ``x``: ``(x, x flattened to (B, N, C))`` for ``cross``."""
    return (x, x.reshape(x.shape[0], -1, x.shape[-1])) if info.layout == "cross" else (x,)


def make_inputs(
    info: MechanismInfo,
    size: int,
    dim: int,
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Random normal inputs for ``info``'s layout at a ``size × size`` token workload."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *token_grid(info, size), dim, generator=gen, dtype=torch.float32)
    return layout_inputs(info, x.to(device=device, dtype=dtype).requires_grad_(requires_grad))


def arrange_tokens(info: MechanismInfo, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs ``info``'s layout takes for a ``(B, H, W, C)`` token map (flattened for sequence/1-D layouts)."""
    b, h, w, c = tokens.shape
    grid = token_grid(info, h)
    if h != w or len(grid) == 3:
        raise ValueError(f"{info.name!r} takes {len(grid)}-D inputs; an image token map {h}×{w} does not fit")
    return layout_inputs(info, tokens.reshape(b, *grid, c))


def build(name: str, dim: int, size: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``attnzoo.create(name, dim, **kwargs)``, plus ``input_resolution`` for mechanisms that take one; eval mode."""
    info = mechanism_info(name)
    kwargs = dict(kwargs or {})
    if info.needs_input_size or "input_resolution" in inspect.signature(info.cls.__init__).parameters:
        kwargs.setdefault("input_resolution", token_grid(info, size))
    return create(name, dim, **kwargs).eval()


def prepare(
    name: str,
    size: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    head_dim: int | None = None,
) -> Prepared:
    """Build ``name`` for a ``size × size``, ``dim``-channel workload, checked by one batch-1 forward.

    Tries the registry defaults, then each argument of the registry test configuration alone, then all of it;
    raises ``PrepareError`` with the reason the defaults failed when none works. With ``head_dim``, an attention
    mechanism whose constructor takes ``head_dim`` gets it (and ``num_heads = dim // head_dim``, keeping the inner
    width at ``dim``) in every attempt, so latencies compare like with like; only when none of those runs is it
    built without (the note says so).
    """
    info = mechanism_info(name)
    base: dict[str, Any] = {}
    parameters = inspect.signature(info.cls.__init__).parameters
    if head_dim is not None and info.is_attention and "head_dim" in parameters:
        base = {"head_dim": head_dim}
        if "num_heads" in parameters and dim % head_dim == 0:  # inner width = dim, as with the default heads
            base["num_heads"] = dim // head_dim
    attempts: list[tuple[dict[str, Any], str]] = [({}, "")]
    singles = [{key: value} for key, value in info.test_kwargs.items()] if len(info.test_kwargs) > 1 else []
    for kwargs in singles + ([dict(info.test_kwargs)] if info.test_kwargs else []):
        attempts.append((kwargs, f"defaults failed; adjusted {kwargs} from the registry test config"))
    if base:
        fallback = [(kwargs, f"{note}; " if note else "") for kwargs, note in attempts]
        attempts = [({**kwargs, **base}, note) for kwargs, note in attempts]
        attempts += [(kwargs, f"{note}head_dim={head_dim} failed, built without it") for kwargs, note in fallback]
    first_error: Exception | None = None
    for kwargs, note in attempts:
        try:
            torch.manual_seed(seed)
            module = build(name, dim, size, kwargs).to(device=device, dtype=dtype)
            with torch.no_grad():
                module(*make_inputs(info, size, dim, 1, dtype=dtype, device=device, seed=seed))
        except (ValueError, TypeError, RuntimeError, NotImplementedError, AssertionError, IndexError) as exc:
            first_error = first_error or exc
            continue
        if note and first_error is not None:
            note = f"{note} (defaults: {one_line(first_error)})"
        return Prepared(name, info, module, kwargs, note)
    assert first_error is not None
    raise PrepareError(f"cannot run at {size}×{size} tokens, dim {dim}: {one_line(first_error)}")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` on one line, shortened to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def output_token_index(input_grid: Sequence[int], output_shape: Sequence[int], query: Sequence[int]) -> tuple[int, ...]:
    """Index (without batch and channel) into an output of ``output_shape`` for the input-grid position ``query``.

    ``query`` is a position on the 2-D ``size × size`` canvas. Outputs with the input's grid use it directly; flat
    outputs of the same token count use the row-major index; a single output token (CLS-style) uses 0; a resampled
    grid (e.g. stride 2) takes the proportional position.
    """
    out_grid = tuple(output_shape[1:-1])
    side = int(round(math.sqrt(math.prod(input_grid))))
    flat = query[0] * side + query[1]
    if math.prod(out_grid) == 1:
        return (0,) * len(out_grid)
    if len(out_grid) == 1:
        n = out_grid[0]
        return (flat if n == side * side else min(n - 1, flat * n // (side * side)),)
    if len(out_grid) == 2:
        return tuple(min(o - 1, q * o // side) for q, o in zip(query, out_grid))
    # 3-D grid (frames, h, w): the middle frame, proportional position in it
    frames, h, w = out_grid
    return (frames // 2, min(h - 1, query[0] * h // side), min(w - 1, query[1] * w // side))
