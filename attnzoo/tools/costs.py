"""What a mechanism costs: parameters, FLOPs, peak memory, latency, and how they scale with the token count.

Peak memory on CPU is measured with ``torch.profiler`` (``profile_memory=True``): every allocation and free made
during one call is an ``[memory]`` event with a signed byte count; the running sum of those events in time order is
the memory the call holds on top of what was live before it (weights and inputs excluded), and its maximum is the
peak. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
Latency is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` after one warm-up call.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

from ..ops import record_backends, use_backend

__all__ = [
    "count_parameters",
    "peak_memory_bytes",
    "median_latency",
    "steady_allocator",
    "add_allocator_option",
    "benchmark_allocator",
    "fit_exponent",
    "make_step",
    "reference_check",
    "REFERENCE_RTOL",
]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_step(module: nn.Module, inputs: Sequence[torch.Tensor], backward: bool) -> Callable[[], Any]:
    """The timed unit of work: a forward under ``torch.no_grad``, or a forward and a backward of ``sum(y)``
    (gradients are dropped at the end of each call, so every call allocates them afresh)."""
    if not backward:

        def forward() -> Any:
            with torch.no_grad():
                return module(*inputs)

        return forward
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    if len(leaves) == 2 and inputs[1].data_ptr() == inputs[0].data_ptr():  # cross with context = x: keep them tied
        leaves[1] = leaves[0].reshape(inputs[1].shape)

    def forward_backward() -> Any:
        y = module(*leaves)
        y.backward(torch.ones_like(y))
        module.zero_grad(set_to_none=True)  # each call allocates (and is charged for) its own gradients
        for leaf in leaves:
            leaf.grad = None
        return y.detach()

    return forward_backward


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines on file descriptor 2 (Python exceptions still propagate)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before it (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return int(peak)


def median_latency(fn: Callable[[], Any], *, threads: int, min_run_time: float = 0.3) -> float:
    """Median seconds per ``fn()`` (one warm-up call, then ``blocked_autorange``) with ``threads`` threads."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def steady_allocator() -> str:
    """Keep freed memory in this process, so that timings do not depend on what the process allocated before.

    glibc hands freed blocks above its mmap threshold back to the kernel, and the next allocation of that size
    page-faults its memory in again; the threshold starts at 128 KiB and rises as such blocks are freed, so whether a
    timed call pays for fresh pages depends on the allocation history, not on the code timed. Sets the mmap threshold
    to its 32 MiB maximum and the trim threshold to 1 GiB, for the rest of the process. Returns what was done (for a
    benchmark's header); a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
            return "glibc mmap threshold 32 MiB, trim threshold 1 GiB"
    except (OSError, AttributeError):
        pass
    return "default allocator (not glibc)"


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--default-allocator`` for a benchmark's command line (see ``benchmark_allocator``)."""
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's adaptive mmap threshold alone (timings then depend on the process's allocation history)",
    )


def benchmark_allocator(args: argparse.Namespace) -> str:
    """Holds the allocator steady for a benchmark (``steady_allocator``) unless ``--default-allocator`` was given;
    returns what it did, for the benchmark's header."""
    return "default allocator" if args.default_allocator else steady_allocator()


def fit_exponent(tokens: Sequence[float], values: Sequence[float]) -> float:
    """Slope of ``log(value)`` against ``log(tokens)`` by least squares (NaN with fewer than two usable points)."""
    pairs = [(t, v) for t, v in zip(tokens, values) if t > 0 and v is not None and v > 0 and math.isfinite(v)]
    if len(pairs) < 2 or len({t for t, _ in pairs}) < 2:
        return float("nan")
    x, y = np.log([t for t, _ in pairs]), np.log([v for _, v in pairs])
    return float(np.polyfit(x, y, 1)[0])


# relative error allowed between a run and its reference-backend run, per dtype of the output
REFERENCE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def reference_check(module: nn.Module, inputs: Sequence[torch.Tensor], *, rtol: float | None = None) -> str:
    """``"ref ok"`` when the output matches the same module run under ``use_backend("reference")`` (relative
    error within ``rtol``, by default ``REFERENCE_RTOL`` of the output dtype), ``"finite"`` when the module makes
    no engine call (``record_backends`` sees none) and its output is finite, otherwise what went wrong:
    non-finite or mismatched output, or engine calls that keep an explicit ``backend=`` under the switch."""
    with torch.no_grad():
        with record_backends() as runs:
            y = module(*inputs)
        if not torch.isfinite(y).all():
            return "NON-FINITE output"
        if not runs:
            return "finite"
        with use_backend("reference"), record_backends() as reference_runs:
            ref = module(*inputs)
    kept = [run for run in reference_runs if run.backend != "reference"]
    if kept:
        return f"REF SKIPPED ({len(kept)} engine calls keep an explicit backend, e.g. {kept[0].backend!r})"
    err = float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    tol = REFERENCE_RTOL.get(y.dtype, 2e-2) if rtol is None else rtol
    return "ref ok" if err <= tol else f"REF MISMATCH (rel err {err:.1e})"
