"""Speed and memory of the neighborhood-attention engine against same-run yardsticks (docs/architecture.md, "Measuring speed").

Workload P: 2-D NA, B=2, heads=4, 56×56 tokens, head_dim=32, kernel 7, fp32.
  R1 = t(SDPA over the 7×7 non-overlapping window partition: same 49 keys per query) / t(na2d)
  R2 = (t(dense SDPA over all N tokens) / t(na2d)) / (N / k²)
  R_natten = t(natten.functional.na2d) / t(na2d), forward (the counterpart a user would pick; natten 0.21 has no CPU
  kernel of its own and no CPU backward), when natten is installed
  fwd+bwd / fwd for na2d (and for the window yardstick, for context)
3-D: B=1, heads=4, 8×28×28, head_dim=32, kernel (3,7,7); yardstick: SDPA over 3×7×7 windows of a 9×28×28 volume
  (the depth 8 is not a multiple of 3), scaled by 8/9 to the same number of queries.
Memory: peak resident memory added by forward+backward at 128×128 vs 64×64 (B=1, heads=4, d=32, k=7), sampled in
  fresh subprocesses (/proc/self/statm), so the native kernel's own buffers are counted too.

Run: ``python benchmarks/engine.py [--threads 2] [--rounds 5] [--json out.json]``. Absolute times on shared machines
drift, so the CPU workloads are timed in ``--rounds`` interleaved rounds (every contender once per round, about
``--min-run-time / rounds`` s each) and every ratio is the median of the per-round ratios, with its min–max spread.
The allocator is held steady (``attnzoo.tools.costs.steady_allocator``; ``--default-allocator`` leaves glibc's
adaptive default, under which whether a call pays page faults for its fresh outputs depends on what ran before).

GPU (``--device cuda``, bf16; see ``gpu_main``): per workload and backend (flex, natten, tiled, auto), forward and
forward+backward, R1 = t(SDPA over the window partition, same keys per query) / t(NA) and
R2 = (t(dense SDPA) / t(NA)) / (dense FLOPs / NA FLOPs); FlexAttention's block-mask build time, first call (compile)
and steady-state time, recompilations after the first call; and whether ``auto`` picked the fastest backend.
Workloads: P (2-D 56×56, B 2, heads 4, d 32, k 7), 2-D 128×128 (B 4, heads 8, d 64, k 13) and 3-D 16×64×64
(B 1, heads 8, d 64, k (3, 13, 13)). Where an extent is not a multiple of the kernel, the window yardstick runs on
the next multiple and is scaled to the same number of queries.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils import benchmark

import attnzoo.ops as ops
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator

STATISTIC = "median"  # or "min": the fastest block, steadier on a shared, noisy machine (--statistic)


def time_ms(fn, threads: int, min_run_time: float) -> float:
    """Time of one call in ms: median (default) or minimum over torch.utils.benchmark's measured blocks."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return (measurement.median if STATISTIC == "median" else min(measurement.times)) * 1e3


def interleaved_ms(fns: dict[str, Callable], threads: int, min_run_time: float, rounds: int) -> dict[str, list[float]]:
    """Per-round times (ms) of every function, the functions timed in turn in each of ``rounds`` rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, threads, min_run_time / rounds))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str, scale: float = 1.0) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``scale · t(num) / t(den)``."""
    r = [scale * a / b for a, b in zip(times[num], times[den])]
    return statistics.median(r), min(r), max(r)


def window_sdpa(q, k, v, window: tuple[int, ...]):
    """SDPA over non-overlapping windows of q, k, v [B, *spatial, h, d] (extents divisible by the window)."""
    axes = "xyz"[: len(window)]
    split = " ".join(f"(n{a} w{a})" for a in axes)
    pattern = f"b {split} h d -> (b {' '.join('n' + a for a in axes)}) h ({' '.join('w' + a for a in axes)}) d"
    sizes = {f"w{a}": w for a, w in zip(axes, window)}
    qw, kw, vw = (rearrange(t, pattern, **sizes) for t in (q, k, v))
    return F.scaled_dot_product_attention(qw, kw, vw)


def dense_sdpa(q, k, v):
    flat = lambda t: t.flatten(1, -3).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(flat(q), flat(k), flat(v))


def fwd_bwd(fn, *tensors):
    leaves = [t.detach().requires_grad_() for t in tensors]

    def run():
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return run


def workload_2d(threads: int, min_run_time: float, backend: str = "auto", rounds: int = 5) -> dict:
    torch.manual_seed(0)
    b, h, side, d, k = 2, 4, 56, 32, 7
    q, kk, v = (torch.randn(b, side, side, h, d) for _ in range(3))
    na = lambda q_, k_, v_: ops.na2d(q_, k_, v_, kernel_size=k, backend=backend)  # noqa: E731
    win = lambda q_, k_, v_: window_sdpa(q_, k_, v_, (k, k))  # noqa: E731
    fns = {
        "na": lambda: na(q, kk, v), "window": lambda: win(q, kk, v), "dense": lambda: dense_sdpa(q, kk, v),
        "na_fb": fwd_bwd(na, q, kk, v), "window_fb": fwd_bwd(win, q, kk, v),
    }  # fmt: skip
    natten_na2d = _natten_na2d() if backend == "auto" else None
    if natten_na2d is not None:
        fns["natten"] = lambda: natten_na2d(q, kk, v, kernel_size=k)
    t = interleaved_ms(fns, threads, min_run_time, rounds)
    med = {name: statistics.median(x) for name, x in t.items()}
    n = side * side
    r1, r2, fb, wfb = (
        ratio(t, "window", "na"),
        ratio(t, "dense", "na", k**2 / n),
        ratio(t, "na_fb", "na"),
        ratio(t, "window_fb", "window"),
    )
    return {
        "backend": backend,
        "t_na_ms": med["na"],
        "t_window_sdpa_ms": med["window"],
        "t_dense_sdpa_ms": med["dense"],
        "t_na_fwd_bwd_ms": med["na_fb"],
        "t_window_fwd_bwd_ms": med["window_fb"],
        "R1": r1[0], "R1_spread": r1[1:],
        "R2": r2[0], "R2_spread": r2[1:],
        "na_fwd_bwd_over_fwd": fb[0], "na_fwd_bwd_over_fwd_spread": fb[1:],
        "window_fwd_bwd_over_fwd": wfb[0],
        "useful_gflops_per_s": 4 * b * h * n * k * k * d / (med["na"] * 1e-3) / 1e9,
        **({"t_natten_ms": med["natten"], "R_natten": (r := ratio(t, "natten", "na"))[0], "R_natten_spread": r[1:]}
           if "natten" in t else {}),
    }  # fmt: skip


def _natten_na2d():
    """natten.functional.na2d with its warnings silenced (on CPU it runs FlexAttention unfused), or None."""
    try:
        import natten
    except ImportError:
        return None

    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return natten.functional.na2d(*args, **kwargs)

    return call


def workload_3d(threads: int, min_run_time: float, rounds: int = 5) -> dict:
    torch.manual_seed(0)
    b, h, d, kernel = 1, 4, 32, (3, 7, 7)
    q, kk, v = (torch.randn(b, 8, 28, 28, h, d) for _ in range(3))
    qp, kp, vp = (torch.randn(b, 9, 28, 28, h, d) for _ in range(3))
    fns = {
        "na": lambda: ops.na3d(q, kk, v, kernel_size=kernel),
        "window": lambda: window_sdpa(qp, kp, vp, kernel),
        "na_fb": fwd_bwd(lambda *t: ops.na3d(*t, kernel_size=kernel), q, kk, v),
    }
    t = interleaved_ms(fns, threads, min_run_time, rounds)
    r1, fb = ratio(t, "window", "na", 8 / 9), ratio(t, "na_fb", "na")
    return {
        "t_na_ms": statistics.median(t["na"]),
        "t_window_sdpa_ms_scaled": statistics.median(t["window"]) * 8 / 9,
        "t_na_fwd_bwd_ms": statistics.median(t["na_fb"]),
        "R1": r1[0], "R1_spread": r1[1:],
        "na_fwd_bwd_over_fwd": fb[0], "na_fwd_bwd_over_fwd_spread": fb[1:],
    }  # fmt: skip


_MEMORY_PROBE = """
import os, threading, time, torch, attnzoo.ops as ops
torch.set_num_threads({threads})
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
side = {side}
q, k, v = (torch.randn(1, side, side, 4, 32, requires_grad=True) for _ in range(3))
ops.na2d(q[:, :8, :8].detach(), k[:, :8, :8].detach(), v[:, :8, :8].detach(), 7)  # build/load the kernel first
before, peak, done = rss(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
out = ops.na2d(q, k, v, 7)
out.backward(torch.ones_like(out))
done[0] = True
sampler.join()
print(max(peak[0], rss()) - before)
"""


def peak_memory_bytes(side: int, threads: int) -> int:
    """Resident memory added by one forward+backward, sampled every 0.5 ms in a fresh process."""
    code = _MEMORY_PROBE.format(side=side, threads=threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


GPU_WORKLOADS = {
    "P_2d_56": dict(batch=2, heads=4, dim=32, spatial=(56, 56), kernel=(7, 7)),
    "2d_128": dict(batch=4, heads=8, dim=64, spatial=(128, 128), kernel=(13, 13)),
    "3d_16x64x64": dict(batch=1, heads=8, dim=64, spatial=(16, 64, 64), kernel=(3, 13, 13)),
}
GPU_BACKENDS = ("flex", "natten", "tiled", "auto")


def cuda_time_ms(fn, min_run_time: float) -> float:
    """Median ms per call over blocks of CUDA-event-timed calls (after 3 warm-up calls), about ``min_run_time`` s."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end), 1e-3)
    calls = max(1, int(min_run_time * 1e3 / 10 / per_call))  # about 10 blocks
    times = []
    spent = 0.0
    while spent < min_run_time * 1e3 or len(times) < 3:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        block = start.elapsed_time(end)
        times.append(block / calls)
        spent += block
    times.sort()
    return times[len(times) // 2]


def _timed_once_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def gpu_workload(name: str, spec: dict, min_run_time: float, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Every backend and the two SDPA yardsticks on one workload (forward and forward+backward); ``device="cpu"``
    runs the same code with CPU timers (a smoke check of this function on machines without a GPU)."""
    from torch._dynamo.utils import counters

    from attnzoo.ops.backends import BACKENDS, select_backend
    from attnzoo.ops.backends.flex import _PLANS, _plan_key, flex_plan
    from attnzoo.ops.problem import make_problem

    if device == "cuda":
        timed, once = cuda_time_ms, _timed_once_ms
    else:
        timed = lambda fn, run_time: time_ms(fn, 1, run_time)  # noqa: E731
        once = lambda fn: time_ms(fn, 1, 0.0)  # noqa: E731
    torch.manual_seed(0)
    b, h, d, spatial, kernel = spec["batch"], spec["heads"], spec["dim"], spec["spatial"], spec["kernel"]
    make = lambda shape: torch.randn(b, *shape, h, d, device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(spatial), make(spatial), make(spatial)
    padded = tuple(-(-s // kk) * kk for s, kk in zip(spatial, kernel))
    qp, kp, vp = make(padded), make(padded), make(padded)
    n, keys = math.prod(spatial), math.prod(kernel)
    scale_queries = n / math.prod(padded)
    win = lambda *t: window_sdpa(*t, kernel)  # noqa: E731
    out = {"spec": {**spec, "dtype": str(dtype)}, "keys_per_query": keys, "tokens": n}
    out["t_window_ms"] = timed(lambda: win(qp, kp, vp), min_run_time) * scale_queries
    out["t_window_fwd_bwd_ms"] = timed(fwd_bwd(win, qp, kp, vp), min_run_time) * scale_queries
    out["t_dense_ms"] = timed(lambda: dense_sdpa(q, k, v), min_run_time)
    out["t_dense_fwd_bwd_ms"] = timed(fwd_bwd(dense_sdpa, q, k, v), min_run_time)
    flop_ratio = n / keys  # dense FLOPs / NA FLOPs (same head dims, every query: N keys vs K keys)
    grad_problem = make_problem(*(t.detach().requires_grad_() for t in (q, k, v)), kernel)
    with torch.no_grad():
        fwd_problem = make_problem(q, k, v, kernel)
    out["auto_fwd"] = select_backend("auto", fwd_problem).name
    out["auto_fwd_bwd"] = select_backend("auto", grad_problem).name
    results = {}
    for backend in GPU_BACKENDS:
        row = {}
        if backend != "auto":
            reasons = BACKENDS[backend].not_supported_reasons(grad_problem)
            if reasons:
                row["skipped"] = "; ".join(reasons)
                results[backend] = row
                continue
        na = lambda q_, k_, v_, be=backend: ops.neighborhood_attention(q_, k_, v_, kernel, backend=be)  # noqa: E731
        if backend == "flex":
            for reorder in (None, True, False):  # time the block-mask build from scratch
                _PLANS.pop(_plan_key(fwd_problem, reorder), None)
            row["block_mask_build_ms"] = once(lambda: flex_plan(fwd_problem))
            row["plan"] = flex_plan(fwd_problem).stats
            row["first_call_fwd_ms"] = once(lambda na=na: na(q, k, v))
            row["first_call_fwd_bwd_ms"] = once(fwd_bwd(na, q, k, v))
            graphs = counters["stats"]["unique_graphs"]
        row["t_fwd_ms"] = timed(lambda na=na: na(q, k, v), min_run_time)
        row["t_fwd_bwd_ms"] = timed(fwd_bwd(na, q, k, v), min_run_time)
        if backend == "flex":
            row["recompiles_after_first_call"] = counters["stats"]["unique_graphs"] - graphs
        for mode, t_na, t_win, t_dense in (
            ("fwd", row["t_fwd_ms"], out["t_window_ms"], out["t_dense_ms"]),
            ("fwd_bwd", row["t_fwd_bwd_ms"], out["t_window_fwd_bwd_ms"], out["t_dense_fwd_bwd_ms"]),
        ):
            row[f"R1_{mode}"] = t_win / t_na
            row[f"R2_{mode}"] = (t_dense / t_na) / flop_ratio
        results[backend] = row
    out["backends"] = results
    for mode, picked in (("fwd", out["auto_fwd"]), ("fwd_bwd", out["auto_fwd_bwd"])):
        timed = {be: r[f"t_{mode}_ms"] for be, r in results.items() if be != "auto" and "skipped" not in r}
        fastest = min(timed, key=timed.get) if timed else None
        out[f"fastest_{mode}"] = fastest
        out[f"auto_within_10pct_{mode}"] = bool(fastest) and results["auto"][f"t_{mode}_ms"] <= 1.1 * timed[fastest]
        out[f"auto_picked_{mode}"] = picked
    return out


def gpu_main(args) -> dict:
    """The GPU benchmark (``--device cuda``): every workload in bf16, then one summary line per backend."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "statistic": "median of CUDA-event-timed blocks",
        "workloads": {},
    }
    try:
        import natten

        results["natten"] = f"{natten.__version__} (libnatten: {getattr(natten, 'HAS_LIBNATTEN', 'unknown')})"
    except ImportError:
        results["natten"] = "not installed"
    names = args.workloads.split(",") if args.workloads else list(GPU_WORKLOADS)
    for name in names:
        w = gpu_workload(name, GPU_WORKLOADS[name], args.min_run_time, torch.bfloat16)
        results["workloads"][name] = w
        print(
            f"{name}: window SDPA {w['t_window_ms']:.3f} ms (fwd+bwd {w['t_window_fwd_bwd_ms']:.3f}) | dense SDPA "
            f"{w['t_dense_ms']:.3f} ms (fwd+bwd {w['t_dense_fwd_bwd_ms']:.3f}) | auto: fwd {w['auto_picked_fwd']}, "
            f"fwd+bwd {w['auto_picked_fwd_bwd']} (fastest {w['fastest_fwd']} / {w['fastest_fwd_bwd']}, within 10 %: "
            f"{w['auto_within_10pct_fwd']} / {w['auto_within_10pct_fwd_bwd']})"
        )
        for backend, r in w["backends"].items():
            if "skipped" in r:
                print(f"  {backend:6s}: skipped ({r['skipped']})")
                continue
            line = (
                f"  {backend:6s}: fwd {r['t_fwd_ms']:.3f} ms R1 {r['R1_fwd']:.2f} R2 {r['R2_fwd']:.2f} | fwd+bwd "
                f"{r['t_fwd_bwd_ms']:.3f} ms R1 {r['R1_fwd_bwd']:.2f} R2 {r['R2_fwd_bwd']:.2f}"
            )
            if backend == "flex":
                line += (
                    f" | block mask {r['block_mask_build_ms']:.0f} ms, first call fwd {r['first_call_fwd_ms']:.0f} ms"
                    f" fwd+bwd {r['first_call_fwd_bwd_ms']:.0f} ms, recompiles {r['recompiles_after_first_call']},"
                    f" order {r['plan']['order']}, computed blocks {r['plan']['computed_blocks']}"
                )
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="CPU: seconds per contender, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds (ratios: median and spread)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--statistic", choices=("median", "min"), default="median")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU benchmark (bf16)")
    parser.add_argument("--workloads", help=f"GPU only: comma-separated subset of {','.join(GPU_WORKLOADS)}")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return gpu_main(args)
    global STATISTIC
    STATISTIC = args.statistic
    torch.set_num_threads(args.threads)
    allocator = benchmark_allocator(args)
    results = {
        "allocator": allocator,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "statistic": args.statistic,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "workload_2d": workload_2d(args.threads, args.min_run_time, rounds=args.rounds),
        "workload_2d_tiled": workload_2d(args.threads, args.min_run_time, backend="tiled", rounds=args.rounds),
        "workload_3d": workload_3d(args.threads, args.min_run_time, rounds=args.rounds),
    }
    if not args.skip_memory:
        m64, m128 = peak_memory_bytes(64, args.threads), peak_memory_bytes(128, args.threads)
        results["memory"] = {"peak_64_bytes": m64, "peak_128_bytes": m128, "ratio_128_over_64": m128 / max(m64, 1)}
    w, t, w3 = results["workload_2d"], results["workload_2d_tiled"], results["workload_3d"]
    spread = lambda r, key: f"{r[key]:.2f} [{r[key + '_spread'][0]:.2f}–{r[key + '_spread'][1]:.2f}]"  # noqa: E731
    print(
        f"threads={args.threads}  statistic={args.statistic}  rounds={args.rounds}  torch {torch.__version__}  {allocator}"
    )
    print(
        f"2-D P  native: {w['t_na_ms']:.2f} ms | window SDPA {w['t_window_sdpa_ms']:.2f} ms | dense SDPA "
        f"{w['t_dense_sdpa_ms']:.1f} ms | R1 {spread(w, 'R1')} | R2 {spread(w, 'R2')} | fwd+bwd/fwd "
        f"{spread(w, 'na_fwd_bwd_over_fwd')} (window SDPA {w['window_fwd_bwd_over_fwd']:.2f}) | "
        f"{w['useful_gflops_per_s']:.1f} useful GFLOP/s"
        + (f" | natten {w['t_natten_ms']:.0f} ms, R_natten {spread(w, 'R_natten')}" if "R_natten" in w else "")
    )
    print(
        f"2-D P  tiled : {t['t_na_ms']:.2f} ms | R1 {spread(t, 'R1')} | fwd+bwd/fwd {spread(t, 'na_fwd_bwd_over_fwd')}"
    )
    print(
        f"3-D    native: {w3['t_na_ms']:.2f} ms | window SDPA (scaled) {w3['t_window_sdpa_ms_scaled']:.2f} ms | "
        f"R1 {spread(w3, 'R1')} | fwd+bwd/fwd {spread(w3, 'na_fwd_bwd_over_fwd')}"
    )
    if "memory" in results:
        m = results["memory"]
        print(
            f"memory fwd+bwd: 64×64 {m['peak_64_bytes'] / 2**20:.1f} MiB, 128×128 {m['peak_128_bytes'] / 2**20:.1f} MiB, "
            f"ratio {m['ratio_128_over_64']:.2f} (tokens ×4; an N×N buffer would be ×16)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
