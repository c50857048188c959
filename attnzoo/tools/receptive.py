"""What a query sees: its gradient receptive field and, for attention mechanisms, its exact attention weights.

The gradient receptive field of output token ``q`` is ``R[p] = Σ_c' Σ_c |∂y[q, c'] / ∂x[p, c]|`` over input
positions ``p``: every output channel's Jacobian row, in absolute value, summed over input and output channels. It is
computed with one backward pass by replicating the input once per output channel along the batch axis (the module
runs in eval mode, so batch elements do not interact). ``exact=False`` instead backpropagates one random projection
of ``y[q]``: the same support (almost surely) at the cost of a single-sample backward.

Freshly built modules can hide their structure behind zero-initialised parameters (zero output projections, γ = 0
gates, zero position tables): ``structural_copy`` gives such parameters small random values first, so the picture
shows what the mixer can see, not that its initialisation ignores it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..mechanisms.registry import MechanismInfo
from ..ops import record_attention
from .workload import PrepareError, layout_inputs, make_inputs, one_line, output_token_index, prepare, token_grid

__all__ = [
    "structural_copy",
    "gradient_receptive_field",
    "receptive_field_tokens",
    "receptive_field_class",
    "classify_fields",
    "AttentionMap",
    "attention_maps",
    "record_calls",
    "maps_from_records",
    "to_canvas",
    "MechanismView",
    "mechanism_view",
]


def structural_copy(module: nn.Module, *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """An eval-mode copy of ``module`` whose all-zero parameters are drawn from ``N(0, std²)``."""
    twin = copy.deepcopy(module).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * std)
    return twin


def to_canvas(values: torch.Tensor, grid: Sequence[int], size: int) -> np.ndarray:
    """Per-token values laid out on ``grid`` (flat, 2-D or frames × 2-D) as a 2-D array; frames are summed."""
    values = values.detach().double().reshape(*grid)
    if len(grid) == 1:
        values = values.reshape(size, size) if grid[0] == size * size else values.reshape(1, -1)
    elif len(grid) == 3:
        values = values.sum(0)
    return values.cpu().numpy()


def canvas_query(grid: Sequence[int], size: int, query: Sequence[int]) -> tuple[int, int]:
    """Where ``query`` (on the ``size × size`` canvas) lands on the picture ``to_canvas`` draws for ``grid``."""
    if len(grid) == 3:
        return (min(grid[1] - 1, query[0] * grid[1] // size), min(grid[2] - 1, query[1] * grid[2] // size))
    return (int(query[0]), int(query[1]))


def gradient_receptive_field(
    module: nn.Module,
    info: MechanismInfo,
    size: int,
    dim: int,
    query: Sequence[int],
    *,
    exact: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """``R[p]`` (module docstring) for the output token at ``query`` of a ``size × size`` input, as a 2-D array."""
    grid = token_grid(info, size)
    (x0, *_) = make_inputs(info, size, dim, 1, seed=seed)
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    copies = dim if exact else 1
    x = x0.to(dtype).expand(copies, *x0.shape[1:]).clone().requires_grad_()
    y = module(*layout_inputs(info, x))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{info.name} returned {type(y).__name__}, expected a tensor")
    index = output_token_index(grid, tuple(y.shape), query)
    row = y[(slice(None), *index)]  # [copies, C_out]
    if exact:
        if row.shape[-1] != copies:
            raise ValueError(f"{info.name} returns {row.shape[-1]} channels for dim={dim}; use exact=False")
        target = torch.diagonal(row).sum()
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        target = (row * torch.randn(row.shape, generator=gen).to(row)).sum()
    (grad,) = torch.autograd.grad(target, x)
    per_token = grad.abs().sum(dim=(0, -1))
    return to_canvas(per_token, grid, size)


def receptive_field_tokens(field: np.ndarray) -> int:
    """Number of input tokens with a nonzero gradient."""
    return int(np.count_nonzero(field))


def classify_fields(centre: np.ndarray, corner: np.ndarray) -> str:
    """The registry's receptive-field class from the 2-D fields of the centre and the first (top-left) query.

    ``"channel"``: the centre query sees one token; ``"global"``: it sees every token; ``"causal"``: it sees
    tokens before it in raster order and none after, and the first query sees only itself; ``"local"``: any other
    strict subset (a neighbourhood, window, stripe, or routed regions).
    """
    rows, cols = np.shape(centre)
    query = (rows // 2) * cols + cols // 2
    seen = np.asarray(centre).reshape(-1) != 0
    count = int(seen.sum())
    if count == 1:
        return "channel"
    if count == seen.size:
        return "global"
    first = np.asarray(corner).reshape(-1) != 0
    if not seen[query + 1 :].any() and seen[:query].any() and first.sum() == 1 and first[0]:
        return "causal"
    return "local"


def receptive_field_class(
    module: nn.Module, info: MechanismInfo, size: int, dim: int, *, seeds: Sequence[int] = (0, 1)
) -> str:
    """``classify_fields`` of ``module`` on a ``size × size`` grid (``size`` even), fields united over ``seeds``.

    The fields are taken on a ``structural_copy`` (no zero-initialised parameter hides a path) and united over
    several random inputs, so a data-dependent zero gradient (a max-pool's unused inputs) does not shrink them.
    """
    if size % 2:
        raise ValueError(f"size={size} must be even (the centre query is (size/2, size/2))")
    twin = structural_copy(module)
    fields = [
        sum(np.abs(gradient_receptive_field(twin, info, size, dim, query, exact=False, seed=seed)) for seed in seeds)
        for query in ((size // 2, size // 2), (0, 0))
    ]
    return classify_fields(*fields)


@dataclass
class AttentionMap:
    """Attention weights of one query over the keys of one engine call, averaged over heads.

    ``on_canvas``: the keys are the input's tokens, so ``weights`` is drawn on the ``size × size`` canvas; otherwise
    ``weights`` is on the call's own key grid (e.g. a window or a pooled map, batch element 0).
    ``query_on_canvas``: the call's queries are the input's tokens (so the row shown is the requested query's);
    otherwise the row is ``op_query`` of the call's own query grid ``op_query_grid`` (an agent, a CLS token, a
    window position). ``query`` is where to mark the query on the picture, ``(-1, -1)`` when it is not on it.
    """

    op: str
    weights: np.ndarray
    query: tuple[int, int]
    on_canvas: bool
    call: int
    calls: int
    extra_weight: float = 0.0
    query_on_canvas: bool = True
    op_query: tuple[int, int] = (0, 0)
    op_query_grid: tuple[int, int] = (1, 1)


def record_calls(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list:
    """The ``attnzoo.ops.record_attention`` records of one forward of ``module(*inputs)`` (no gradients)."""
    with torch.no_grad(), record_attention() as records:
        module(*inputs)
    return list(records)


def attention_maps(
    module: nn.Module, inputs: Sequence[torch.Tensor], size: int, query: Sequence[int]
) -> list[AttentionMap]:
    """Exact attention weights of ``query`` in every engine call ``module(*inputs)`` makes (batch element 0).

    Returns ``[]`` for a mechanism that makes no attention call.
    """
    return maps_from_records(record_calls(module, inputs), size, query)


def maps_from_records(records: Sequence, size: int, query: Sequence[int]) -> list[AttentionMap]:
    """``AttentionMap``s of ``query`` (on a ``size × size`` canvas) from attention records, averaged over heads."""
    maps: list[AttentionMap] = []
    n = size * size
    for i, rec in enumerate(records):
        q_tokens, k_tokens = math.prod(rec.query_shape), math.prod(rec.key_shape)
        extra = getattr(rec, "extra_keys", 0)
        spatial_keys = rec.weights.shape[-1] - extra
        side_q = (size, size) if q_tokens == n else _square_side(rec.query_shape)
        if q_tokens == n:
            op_query = (int(query[0]), int(query[1]))
        else:  # the call's own grid: padded (larger: same coordinates) or pooled (smaller: proportional)
            op_query = tuple(min(s - 1, c if s >= size else c * s // size) for s, c in zip(side_q, query))
        weights = rec.weights[0, :, op_query[0] * side_q[1] + op_query[1]].mean(0)
        spatial, extra_weight = weights[:spatial_keys], float(weights[spatial_keys:].sum())
        on_canvas = k_tokens == n and spatial_keys == n
        picture = spatial.reshape((size, size) if on_canvas else _square_side(rec.key_shape)).cpu().numpy()
        same_grid = (q_tokens == n) == on_canvas and (on_canvas or q_tokens == k_tokens)
        maps.append(
            AttentionMap(
                rec.op,
                picture,
                op_query if same_grid else (-1, -1),
                on_canvas,
                i,
                len(records),
                extra_weight,
                query_on_canvas=q_tokens == n,
                op_query=op_query,
                op_query_grid=side_q,
            )
        )
    return maps


def _square_side(shape: Sequence[int]) -> tuple[int, int]:
    """A 2-D picture shape for a call's spatial shape (1-D calls are drawn square when they are a square count)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 1:
        side = int(round(math.sqrt(shape[0])))
        return (side, side) if side * side == shape[0] else (1, shape[0])
    return (math.prod(shape[:-1]), shape[-1])


@dataclass
class MechanismView:
    """Everything drawn for one mechanism: per query, its receptive field and its attention map (or None).

    ``queries`` are positions on the drawn picture; ``config`` the kwargs beyond the registry defaults (the test
    configuration, when the defaults cannot take the size); ``error`` is set (and nothing else) when the mechanism
    cannot run at the requested size.
    """

    name: str
    queries: list[tuple[int, int]] = field(default_factory=list)
    fields: list[np.ndarray] = field(default_factory=list)
    attention: list[AttentionMap | None] = field(default_factory=list)
    attention_note: str = ""
    error: str = ""
    config: dict = field(default_factory=dict)


def _preferred(maps: list[AttentionMap]) -> AttentionMap | None:
    """The call to draw: the first whose queries and keys are the input tokens, else the first whose queries are
    (what the requested query attends to), else the first whose keys are, else the first call."""
    for wanted in (lambda m: m.query_on_canvas and m.on_canvas, lambda m: m.query_on_canvas, lambda m: m.on_canvas):
        found = next((m for m in maps if wanted(m)), None)
        if found is not None:
            return found
    return maps[0] if maps else None


def mechanism_view(
    name: str, size: int, dim: int, queries: Sequence[tuple[int, int]], *, strict: bool = True, attention: bool = True
) -> MechanismView:
    """Receptive fields (exact channel sums) and attention maps of ``name`` at ``size × size`` for ``queries``.

    ``strict``: raise ``PrepareError`` when the mechanism cannot run at ``size``; otherwise return a view whose
    ``error`` says why.
    """
    view = MechanismView(name)
    try:
        prepared = prepare(name, size, dim)
    except PrepareError as exc:
        if strict:
            raise
        view.error = str(exc)
        return view
    info, module = prepared.info, structural_copy(prepared.module)
    view.config = dict(prepared.kwargs)
    grid = token_grid(info, size)
    for q in queries:
        try:
            rf = gradient_receptive_field(module, info, size, dim, q, exact=True)
        except ValueError:  # output width differs from dim: a random projection gives the same support
            rf = gradient_receptive_field(module, info, size, dim, q, exact=False)
        view.fields.append(rf)
        view.queries.append(canvas_query(grid, size, q))
    if not attention:
        return view
    if not info.is_attention:
        view.attention_note = "not an attention mechanism: no attention weights"
    else:
        inputs = make_inputs(info, size, dim, 1)
        try:
            view.attention = [_preferred(attention_maps(module, inputs, size, q)) for q in queries]
        except (ValueError, RuntimeError) as exc:
            view.attention, view.attention_note = [], f"attention not recorded: {one_line(exc)}"
        if not any(view.attention):
            view.attention = []
            view.attention_note = view.attention_note or "no engine attention call was recorded"
    return view
