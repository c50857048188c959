"""Benchmark one registered mechanism at a workload: every figure ``attnzoo bench`` reports, as one ``BenchRow``.

A mechanism that cannot be built or run gives a row with ``ok=False`` and the reason; nothing is raised.
``yardstick_latency`` times dense attention (SDPA over all tokens) at the same workload, so each run can report
latencies relative to a yardstick measured on the same machine at the same time (absolute times drift with load).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mechanisms import mechanism_info
from ..ops import count_flops
from .costs import (
    count_parameters,
    fit_exponent,
    make_step,
    median_latency,
    peak_memory_bytes,
    reference_check,
)
from .receptive import gradient_receptive_field, receptive_field_tokens, structural_copy
from .workload import build, make_inputs, one_line, prepare

__all__ = [
    "BenchConfig",
    "ScalingPoint",
    "BenchRow",
    "bench_mechanism",
    "yardstick_latency",
    "DenseAttention",
    "DEFAULT_SWEEP",
]

# Grid sides of the scaling sweep when a report is written and no sweep is asked for.
DEFAULT_SWEEP = (14, 28, 56)


@dataclass(frozen=True)
class BenchConfig:
    """The workload: ``size × size`` tokens of ``dim`` channels, ``batch`` images; ``sizes`` for the scaling sweep."""

    size: int = 56
    dim: int = 64
    batch: int = 2
    threads: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False
    sizes: tuple[int, ...] = ()
    min_run_time: float = 0.3
    sweep_min_run_time: float = 0.1
    head_dim: int | None = 32  # given to every attention mechanism that takes it (None: registry defaults)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class ScalingPoint:
    size: int
    tokens: int
    latency_s: float = math.nan
    peak_bytes: float = math.nan
    error: str = ""


@dataclass
class BenchRow:
    """Figures for one mechanism (NaN where not measured); ``error`` says why a mechanism failed."""

    name: str
    family: str = ""
    complexity: str = ""
    layout: str = ""
    ok: bool = False
    error: str = ""
    note: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    flops: float = math.nan
    peak_bytes: float = math.nan
    latency_s: float = math.nan
    throughput: float = math.nan
    relative_latency: float = math.nan
    check: str = ""
    receptive_field_tokens: float = math.nan
    receptive_field_fraction: float = math.nan
    scaling: list[ScalingPoint] = field(default_factory=list)
    latency_exponent: float = math.nan
    memory_exponent: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        plain = (int, float, str, bool, type(None))
        out["config"] = {k: v if isinstance(v, plain) else repr(v) for k, v in self.config.items()}
        return out


def _measure(step, cfg: BenchConfig, min_run_time: float) -> tuple[float, float]:
    """Median latency and peak memory of one ``make_step`` unit of work."""
    latency = median_latency(step, threads=cfg.threads, min_run_time=min_run_time)
    return latency, float(peak_memory_bytes(step, cfg.device))


def bench_mechanism(name: str, cfg: BenchConfig, yardstick_s: float | None = None) -> BenchRow:
    """Measure ``name`` at ``cfg`` (see ``BenchRow``); failures are reported in the row.

    ``yardstick_s``: the ``yardstick_latency`` of this run, which ``relative_latency`` divides by (NaN without it)."""
    info = mechanism_info(name)
    row = BenchRow(name, info.family, info.complexity, info.layout)
    try:
        prepared = prepare(name, cfg.size, cfg.dim, dtype=cfg.torch_dtype, device=cfg.device, head_dim=cfg.head_dim)
        module = prepared.module
        row.note, row.config = prepared.note, prepared.kwargs
        row.params = count_parameters(module)
        inputs = make_inputs(info, cfg.size, cfg.dim, cfg.batch, dtype=cfg.torch_dtype, device=cfg.device)
        step = make_step(module, inputs, cfg.backward)
        row.flops = float(count_flops(step))
        row.check = reference_check(module, inputs)
        row.latency_s, row.peak_bytes = _measure(step, cfg, cfg.min_run_time)
        row.throughput = cfg.batch / row.latency_s
        if yardstick_s is not None:
            row.relative_latency = row.latency_s / yardstick_s
        row.receptive_field_tokens, row.receptive_field_fraction = _receptive_field(module, info, cfg)
    except Exception as exc:  # a broken mechanism must not stop the run: its row says why
        row.error = one_line(exc)
        return row
    row.ok = row.check in ("ref ok", "finite")
    if not row.ok:
        row.error = row.check
    for size in cfg.sizes:
        row.scaling.append(_scaling_point(name, size, prepared.kwargs, cfg))
    tokens = [p.tokens for p in row.scaling]
    row.latency_exponent = fit_exponent(tokens, [p.latency_s for p in row.scaling])
    row.memory_exponent = fit_exponent(tokens, [p.peak_bytes for p in row.scaling])
    return row


class DenseAttention(nn.Module):
    """The yardstick: softmax attention of every token over every token (SDPA), no projections, 32-wide heads."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        heads = max(1, dim // 32)
        self.heads = heads if dim % heads == 0 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(b, n, c)


def yardstick_latency(cfg: BenchConfig) -> float:
    """Median seconds of ``DenseAttention`` on ``cfg``'s workload (forward, or forward+backward with ``backward``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, cfg.size * cfg.size, cfg.dim, generator=gen).to(device=cfg.device, dtype=cfg.torch_dtype)
    step = make_step(DenseAttention(cfg.dim), (x,), cfg.backward)
    return median_latency(step, threads=cfg.threads, min_run_time=cfg.min_run_time)


def _receptive_field(module, info, cfg: BenchConfig) -> tuple[float, float]:
    """Tokens reaching the centre query (one projected backward on a structural copy) and their fraction."""
    centre = (cfg.size // 2, cfg.size // 2)
    twin = structural_copy(module).float().cpu()
    field_ = gradient_receptive_field(twin, info, cfg.size, cfg.dim, centre, exact=False)
    tokens = receptive_field_tokens(field_)
    return float(tokens), tokens / field_.size


def _scaling_point(name: str, size: int, kwargs: dict[str, Any], cfg: BenchConfig) -> ScalingPoint:
    info = mechanism_info(name)
    point = ScalingPoint(size, size * size)
    try:
        torch.manual_seed(0)
        module = build(name, cfg.dim, size, kwargs).to(device=cfg.device, dtype=cfg.torch_dtype)
        inputs = make_inputs(info, size, cfg.dim, cfg.batch, dtype=cfg.torch_dtype, device=cfg.device)
        step = make_step(module, inputs, cfg.backward)
        point.latency_s, point.peak_bytes = _measure(step, cfg, cfg.sweep_min_run_time)
    except Exception as exc:  # one size a mechanism cannot take leaves a gap in its curve, not a crash
        point.error = one_line(exc)
    return point
