"""Neighborhood attention on ``torch.nn.attention.flex_attention`` with a block-sparse ``BlockMask``.

As in NATTEN's and GNA's Flex paths (Hassani et al., *Generalized Neighborhood Attention*, 2025), tokens are
reordered before the call so that each block of 128 consecutive tokens is one spatial tile: per axis the
coordinates are grouped by dilation group, then by tile of ``tile_shape`` sub-lattice positions, and each dilation
group is padded to whole tiles (padding tokens are masked out; where that would add more than 1/8 of the
tokens, edge tiles stay partial instead). The block mask is then exact and dense: it lists
only blocks that hold at least one allowed (query, key) pair, and marks a block *full* (no ``mask_mod`` call in the
kernel) when every pair in it is allowed. The per-token lookup tables come from ``geometry.axis_windows``, the same
per-axis window tables every backend uses.

``rel_pos_bias`` and ``key_bias`` enter as a ``score_mod``; additional keys are appended after the spatial keys and
attend from every query in the same softmax. Kernels are compiled with ``torch.compile(dynamic=False)`` and plans
(tables, block mask) are cached per geometry, so repeated calls of one shape reuse one compiled graph.
On CPU torch's FlexAttention is forward-only and its compiled kernel returns no logsumexp: there, a call with
``return_lse`` runs torch's unfused (eager) FlexAttention on the same block mask and ``score_mod``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..geometry import axis_windows
from ..problem import NAProblem
from .base import Backend

try:  # torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover - torch < 2.5 is below the declared minimum
    _flex_module = None

BLOCK_SIZE = 128
_PAD_COORD = -(1 << 20)  # key coordinate of a padding token: never inside any window
_MIN_CUDA_HEAD_DIM = 16  # torch's Triton FlexAttention kernel needs head dims >= 16 (tl.dot)
_MAX_PADDING = 0.125  # above this share of padding tokens, edge tiles stay partial instead of being padded
_CHUNK_PAIRS = 1 << 24  # (query, key) pairs evaluated at once while building a block mask
_RECOMPILE_LIMIT = 64  # distinct geometries (shapes, dtypes, options) compiled before dynamo falls back to eager
_MAX_PLANS = 64  # cached geometries (oldest dropped first)

__all__ = ["FlexBackend", "FlexPlan", "flex_plan", "tile_shape"]


def tile_shape(sub_extents: tuple[int, ...], block: int = BLOCK_SIZE) -> tuple[int, ...]:
    """Per-axis tile lengths (sub-lattice positions) whose product reaches ``block``: the smallest tile axis that
    is still shorter than its extent is doubled (the last axis first on ties), capped at the extent."""
    tile = [1] * len(sub_extents)
    while math.prod(tile) < block:
        growable = [a for a in range(len(tile)) if tile[a] < sub_extents[a]]
        if not growable:
            break
        axis = min(reversed(growable), key=lambda a: tile[a])
        tile[axis] = min(2 * tile[axis], sub_extents[axis])
    return tuple(tile)


def _axis_slots(extent: int, dilation: int, tile: int) -> torch.Tensor:
    """int64 [m, 4]: per slot along one axis (dilation group r, tile t, position in tile w, coordinate or -1)."""
    rows = []
    for r in range(dilation):
        length = len(range(r, extent, dilation))
        for t in range(-(-length // tile)):
            for w in range(tile):
                u = t * tile + w
                rows.append((r, t, w, r + dilation * u if u < length else -1))
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class FlexPlan:
    """Everything one geometry needs on one device: the token order, the lookup tables and the block mask."""

    source: torch.Tensor  # int64 [n_pad]: original flat token of each reordered slot, ``num_tokens`` for padding
    inverse: torch.Tensor  # int64 [N]: reordered slot of each original token
    key_coord: tuple[torch.Tensor, ...]  # per axis int32 [length]: key coordinate of each slot
    query_start: tuple[torch.Tensor, ...]  # per axis int32 [length]: first key coordinate of the slot's window
    query_count: tuple[torch.Tensor, ...]  # per axis int32 [length]: keys in the window (0 for padding)
    query_rel: tuple[torch.Tensor, ...]  # per axis int32 [length]: relative-position index of the first key
    dilation: tuple[int, ...]
    rel_size: tuple[int, ...]  # 2·kernel_size - 1 per axis
    n_pad: int  # reordered spatial tokens (padding included)
    num_additional: int
    tile: tuple[int, ...]
    block_mask: object = None
    stats: dict = field(default_factory=dict)

    @property
    def kv_len(self) -> int:
        return self.n_pad + self.num_additional

    def mask_mod(self, b, h, q_idx, kv_idx):
        """True where key ``kv_idx`` is in the window of query ``q_idx`` (reordered indices), or is additional."""
        allowed = None
        for kc, qs, qn, d in zip(self.key_coord, self.query_start, self.query_count, self.dilation):
            offset = kc[kv_idx] - qs[q_idx]
            inside = (offset >= 0) & (offset < qn[q_idx] * d)
            if d > 1:
                inside = inside & (offset % d == 0)
            allowed = inside if allowed is None else allowed & inside
        if self.num_additional:
            real_query = self.query_count[0][q_idx] > 0  # padding slots have no window
            allowed = allowed | ((kv_idx >= self.n_pad) & (kv_idx < self.kv_len) & real_query)
        return allowed

    def rel_index(self, q_idx, kv_idx):
        """Flat index into a ``[heads, *(2k-1)]`` table (row-major over axes), clamped into range off the mask."""
        index = None
        for kc, qs, qr, d, size in zip(self.key_coord, self.query_start, self.query_rel, self.dilation, self.rel_size):
            step = torch.div(kc[kv_idx] - qs[q_idx], d, rounding_mode="floor") if d > 1 else kc[kv_idx] - qs[q_idx]
            axis = (qr[q_idx] + step).clamp(0, size - 1)
            index = axis if index is None else index * size + axis
        return index


def _plan_tables(shape, kernel, stride, dilation, causal, num_additional, reorder):
    """Token order (tiles if ``reorder``, else row-major) and per-slot lookup tables, on the CPU."""
    windows = [axis_windows(*args) for args in zip(shape, kernel, stride, dilation, causal)]
    if reorder:
        tile = tile_shape(tuple(-(-L // d) for L, d in zip(shape, dilation)))
        slots = [_axis_slots(L, d, t) for L, d, t in zip(shape, dilation, tile)]
    else:  # row-major order, no padding
        tile = tuple(shape)
        slots = [torch.stack([torch.zeros(L, dtype=torch.int64)] * 2 + [torch.arange(L)] * 2, 1) for L in shape]
    grids = torch.meshgrid(*[torch.arange(len(s)) for s in slots], indexing="ij")
    picked = [s[g.flatten()] for s, g in zip(slots, grids)]  # per axis [M, 4]
    key = torch.zeros(picked[0].shape[0], dtype=torch.int64)
    for component in range(3):  # dilation groups, then tiles, then positions in a tile
        for s in picked:
            key = key * (int(s[:, component].max()) + 1) + s[:, component]
    order = torch.argsort(key)
    coords = [s[order, 3] for s in picked]  # per axis [n_pad], -1 for padding
    pad = torch.zeros_like(order, dtype=torch.bool)
    for c in coords:
        pad |= c < 0
    if reorder and pad.float().mean() > _MAX_PADDING:  # small canvases: partial tiles instead of much padding
        coords = [c[~pad] for c in coords]
        pad = pad[~pad]
    n = math.prod(shape)
    flat = torch.zeros_like(pad, dtype=torch.int64)
    for c, L in zip(coords, shape):
        flat = flat * L + c.clamp(min=0)
    source = torch.where(pad, torch.full_like(flat, n), flat)
    inverse = torch.empty(n, dtype=torch.int64)
    inverse[source[~pad]] = torch.nonzero(~pad).flatten()
    n_pad = len(pad)
    length = -(-(n_pad + num_additional) // BLOCK_SIZE) * BLOCK_SIZE  # tables cover every block the kernel reads

    def table(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((length,), fill, dtype=torch.int32)
        out[:n_pad] = torch.where(pad, torch.full_like(values, fill), values).to(torch.int32)
        return out

    key_coord, query_start, query_count, query_rel = [], [], [], []
    for c, w in zip(coords, windows):
        at = c.clamp(min=0)
        key_coord.append(table(c, _PAD_COORD))
        query_start.append(table(w.start[at], 0))
        query_count.append(table(w.count[at], 0))
        query_rel.append(table(w.rel_start[at], 0))
    return dict(
        source=source,
        inverse=inverse,
        key_coord=key_coord,
        query_start=query_start,
        query_count=query_count,
        query_rel=query_rel,
        dilation=tuple(dilation),
        rel_size=tuple(2 * k - 1 for k in kernel),
        n_pad=n_pad,
        num_additional=num_additional,
        tile=tile,
    )


def _block_mask(plan: FlexPlan, device: torch.device):
    """The exact block mask of ``plan``: blocks with an allowed pair are computed, those with every pair allowed
    (and no padding past the sequence ends) are full. Built in chunks of query rows, never an N×N tensor."""
    q_len, kv_len = plan.n_pad, plan.kv_len
    nq, nk = -(-q_len // BLOCK_SIZE), -(-kv_len // BLOCK_SIZE)
    rows = max(BLOCK_SIZE, (_CHUNK_PAIRS // (nk * BLOCK_SIZE)) // BLOCK_SIZE * BLOCK_SIZE)
    keys = torch.arange(nk * BLOCK_SIZE, device=device)
    key_valid = keys < kv_len
    counts, valid = [], []
    for first in range(0, nq * BLOCK_SIZE, rows):
        queries = torch.arange(first, min(first + rows, nq * BLOCK_SIZE), device=device)
        allowed = plan.mask_mod(None, None, queries[:, None], keys[None, :]) & key_valid & (queries[:, None] < q_len)
        blocks = allowed.reshape(-1, BLOCK_SIZE, nk, BLOCK_SIZE)
        counts.append(blocks.sum((1, 3), dtype=torch.int64))
        pairs = (queries < q_len).reshape(-1, BLOCK_SIZE).sum(1)[:, None] * key_valid.reshape(nk, BLOCK_SIZE).sum(1)
        valid.append(pairs)
    counts, valid = torch.cat(counts), torch.cat(valid)
    full = counts == BLOCK_SIZE * BLOCK_SIZE
    partial = (counts > 0) & ~full

    def ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = flags.sum(1).to(torch.int32)
        index = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return num[None, None], index[None, None].contiguous()

    kv_num, kv_index = ordered(partial)
    full_num, full_index = ordered(full)
    block_mask = _flex_module.BlockMask.from_kv_blocks(
        kv_num,
        kv_index,
        full_num,
        full_index,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=plan.mask_mod,
        seq_lengths=(q_len, kv_len),
    )
    computed = int((counts > 0).sum())
    stats = {
        "q_blocks": nq,
        "kv_blocks": nk,
        "computed_blocks": computed,
        "full_blocks": int(full.sum()),
        "partial_blocks": int(partial.sum()),
        "block_density": computed / (nq * nk),
        # blocks with no allowed pair are never listed, so none of the computed ones is fully masked
        "fully_masked_fraction": 0.0,
        "masked_pair_fraction": 1.0 - float(counts.sum()) / (computed * BLOCK_SIZE * BLOCK_SIZE),
        "padding_fraction": 1.0 - math.prod(plan.inverse.shape) / plan.n_pad,
        "tile_shape": plan.tile,
    }
    return block_mask, stats


_PLANS: dict[tuple, FlexPlan] = {}  # per geometry and device; a plain dict, so torch.compile can read it


def _plan_key(problem: NAProblem, reorder: bool | None = None) -> tuple:
    p = problem
    return (p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal, p.num_additional, str(p.device), reorder)


def _build_plan(key: tuple) -> FlexPlan:
    shape, kernel, stride, dilation, causal, num_additional, device, reorder = key
    tables = _plan_tables(shape, kernel, stride, dilation, causal, num_additional, reorder)
    moved = {k: tuple(t.to(device) for t in v) if isinstance(v, list) else v for k, v in tables.items()}
    moved["source"], moved["inverse"] = tables["source"].to(device), tables["inverse"].to(device)
    plan = FlexPlan(**moved)
    plan.block_mask, plan.stats = _block_mask(plan, torch.device(device))
    plan.stats["order"] = "tiles" if reorder else "row-major"
    return plan


def flex_plan(problem: NAProblem, reorder: bool | None = None) -> FlexPlan:
    """The cached plan of ``problem``'s geometry. ``reorder``: True plans tile order, False row-major order, None
    (what the backend runs) the one of the two that computes fewer blocks: tiles win when rows are long compared to
    the kernel (128×128, k 13: about 0.6 of row-major's blocks), row-major when a block spans whole rows.
    ``plan.stats`` holds the block-sparsity diagnostics (``fully_masked_fraction``; ``masked_pair_fraction``, the
    share of computed (query, key) pairs that are masked; ``block_density``; ``padding_fraction``; ``order``)."""
    key = _plan_key(problem, reorder)
    if key not in _PLANS:
        if reorder is None:
            tiles, rows = flex_plan(problem, True), flex_plan(problem, False)
            plan = tiles if tiles.stats["computed_blocks"] <= rows.stats["computed_blocks"] else rows
        else:
            plan = _build_plan(key)
        while len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return _PLANS[key]


def _flex_apply(q, k, v, block_mask, plan: FlexPlan, rel_table, key_bias, scale: float, want_lse: bool):
    """One FlexAttention call on reordered ``[B, H, L, d]`` tensors (compiled on first use per geometry)."""
    score_mod = None
    if rel_table is not None or key_bias is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = None
            if rel_table is not None:
                bias = rel_table[h, plan.rel_index(q_idx, kv_idx)]
                if plan.num_additional:
                    bias = torch.where(kv_idx < plan.n_pad, bias, torch.zeros_like(bias))
            if key_bias is not None:
                bias = key_bias[b, h, kv_idx] if bias is None else bias + key_bias[b, h, kv_idx]
            return score + bias

    if not want_lse:
        return _flex_module.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale), None
    if hasattr(_flex_module, "AuxRequest"):
        out, aux = _flex_module.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            return_aux=_flex_module.AuxRequest(lse=True),
        )
        return out, aux.lse
    return _flex_module.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True
    )


_compiled_apply = torch.compile(_flex_apply, dynamic=False) if _flex_module is not None else None


def _recompile_limit_patch():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), _RECOMPILE_LIMIT)})


class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention with an exact block mask over tile-reordered tokens (CUDA fwd+bwd, CPU fwd)"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        p = problem
        reasons = []
        if _flex_module is None:
            return ["needs torch.nn.attention.flex_attention (torch >= 2.5)"]
        if p.device.type not in ("cuda", "cpu"):
            reasons.append(f"runs on CUDA or CPU, got device {p.device}")
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"supports float32, float16 and bfloat16, got {p.dtype}")
        if torch.compiler.is_compiling() and _plan_key(p) not in _PLANS:
            reasons.append(
                "inside torch.compile a new geometry's block mask cannot be built: run the call once eagerly first"
            )
        if p.device.type == "cpu" and p.requires_grad:
            reasons.append("no backward on CPU: torch's CPU FlexAttention is forward-only (call it under no_grad)")
        return reasons

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        p = problem
        # inside a user's torch.compile the plan is read from the cache (planned outside tracing, see reasons)
        plan = _PLANS[_plan_key(p)] if torch.compiler.is_compiling() else flex_plan(p)
        b, h, n = p.batch, p.heads, p.num_tokens

        def reorder(x: torch.Tensor) -> torch.Tensor:  # [B, *spatial, h, c] -> [B, h, n_pad, c]
            flat = x.reshape(b, n, h, x.shape[-1])
            flat = torch.cat([flat, flat.new_zeros(b, 1, h, x.shape[-1])], dim=1)
            return flat.index_select(1, plan.source).transpose(1, 2)

        qr, kr, vr = reorder(q), reorder(k), reorder(v)
        if additional_keys is not None:
            kr = torch.cat([kr, additional_keys.transpose(1, 2)], dim=2)
            vr = torch.cat([vr, additional_values.transpose(1, 2)], dim=2)
        d, dv = p.head_dim, p.head_dim_v
        if q.device.type == "cuda" and min(d, dv) < _MIN_CUDA_HEAD_DIM:  # zero channels change no logit
            qr, kr = (F.pad(t, (0, max(0, _MIN_CUDA_HEAD_DIM - d))) for t in (qr, kr))
            vr = F.pad(vr, (0, max(0, _MIN_CUDA_HEAD_DIM - dv)))
        table = None if rel_pos_bias is None else rel_pos_bias.reshape(h, -1).float()
        kb = None
        if key_bias is not None:
            kb = reorder(key_bias.expand(b, *p.spatial_shape, h).unsqueeze(-1).float()).squeeze(-1)  # [B, h, n_pad]
            kb = F.pad(kb, (0, plan.kv_len - plan.n_pad))
        args = (qr, kr, vr, plan.block_mask, plan, table, kb, float(scale))
        if torch.compiler.is_compiling():  # inside a user's torch.compile: traced into their graph
            out, lse = _flex_apply(*args, p.return_lse)
        elif q.device.type == "cpu" and p.return_lse:  # the compiled CPU kernel has no logsumexp output
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out, lse = _flex_apply(*args, True)
        else:
            with _recompile_limit_patch():
                out, lse = _compiled_apply(*args, p.return_lse)
        out = out[..., :dv].transpose(1, 2).index_select(1, plan.inverse).reshape(*q.shape[:-1], dv)
        if lse is not None:
            lse = lse.transpose(1, 2).index_select(1, plan.inverse).reshape(q.shape[:-1]).float()
        return out.to(q.dtype), lse
