"""Speed and memory of the neighborhood-attention engine against same-run yardsticks (docs/architecture.md, "Measuring speed").

Workload P: 2-D NA, B=2, heads=4, 56×56 tokens, head_dim=32, kernel 7, fp32.
  R1 = t(SDPA over the 7×7 non-overlapping window partition: same 49 keys per query) / t(na2d)
  R2 = (t(dense SDPA over all N tokens) / t(na2d)) / (N / k²)
  fwd+bwd / fwd for na2d (and for the window yardstick, for context)
3-D: B=1, heads=4, 8×28×28, head_dim=32, kernel (3,7,7); yardstick: SDPA over 3×7×7 windows of a 9×28×28 volume
  (the depth 8 is not a multiple of 3), scaled by 8/9 to the same number of queries.
Memory: peak resident memory added by forward+backward at 128×128 vs 64×64 (B=1, heads=4, d=32, k=7), sampled in
  fresh subprocesses (/proc/self/statm), so the native kernel's own buffers are counted too.

Run: ``python benchmarks/engine.py [--threads 2] [--json out.json]``. Absolute times on shared machines drift; the
ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils import benchmark

import attnzoo.ops as ops


STATISTIC = "median"  # or "min": the fastest block, steadier on a shared, noisy machine (--statistic)


def time_ms(fn, threads: int, min_run_time: float) -> float:
    """Time of one call in ms: median (default) or minimum over torch.utils.benchmark's measured blocks."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return (measurement.median if STATISTIC == "median" else min(measurement.times)) * 1e3


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


def workload_2d(threads: int, min_run_time: float, backend: str = "auto") -> dict:
    torch.manual_seed(0)
    b, h, side, d, k = 2, 4, 56, 32, 7
    q, kk, v = (torch.randn(b, side, side, h, d) for _ in range(3))
    na = lambda q_, k_, v_: ops.na2d(q_, k_, v_, kernel_size=k, backend=backend)  # noqa: E731
    win = lambda q_, k_, v_: window_sdpa(q_, k_, v_, (k, k))  # noqa: E731
    t_na = time_ms(lambda: na(q, kk, v), threads, min_run_time)
    t_win = time_ms(lambda: win(q, kk, v), threads, min_run_time)
    t_dense = time_ms(lambda: dense_sdpa(q, kk, v), threads, min_run_time)
    t_na_fb = time_ms(fwd_bwd(na, q, kk, v), threads, min_run_time)
    t_win_fb = time_ms(fwd_bwd(win, q, kk, v), threads, min_run_time)
    n = side * side
    return {
        "backend": backend,
        "t_na_ms": t_na,
        "t_window_sdpa_ms": t_win,
        "t_dense_sdpa_ms": t_dense,
        "t_na_fwd_bwd_ms": t_na_fb,
        "t_window_fwd_bwd_ms": t_win_fb,
        "R1": t_win / t_na,
        "R2": (t_dense / t_na) / (n / k**2),
        "na_fwd_bwd_over_fwd": t_na_fb / t_na,
        "window_fwd_bwd_over_fwd": t_win_fb / t_win,
        "useful_gflops_per_s": 4 * b * h * n * k * k * d / (t_na * 1e-3) / 1e9,
    }


def workload_3d(threads: int, min_run_time: float) -> dict:
    torch.manual_seed(0)
    b, h, d, kernel = 1, 4, 32, (3, 7, 7)
    q, kk, v = (torch.randn(b, 8, 28, 28, h, d) for _ in range(3))
    qp, kp, vp = (torch.randn(b, 9, 28, 28, h, d) for _ in range(3))
    t_na = time_ms(lambda: ops.na3d(q, kk, v, kernel_size=kernel), threads, min_run_time)
    t_win = time_ms(lambda: window_sdpa(qp, kp, vp, kernel), threads, min_run_time) * 8 / 9
    t_na_fb = time_ms(fwd_bwd(lambda *t: ops.na3d(*t, kernel_size=kernel), q, kk, v), threads, min_run_time)
    return {
        "t_na_ms": t_na,
        "t_window_sdpa_ms_scaled": t_win,
        "t_na_fwd_bwd_ms": t_na_fb,
        "R1": t_win / t_na,
        "na_fwd_bwd_over_fwd": t_na_fb / t_na,
    }


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--statistic", choices=("median", "min"), default="median")
    args = parser.parse_args(argv)
    global STATISTIC
    STATISTIC = args.statistic
    torch.set_num_threads(args.threads)
    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "statistic": args.statistic,
        "torch": torch.__version__,
        "workload_2d": workload_2d(args.threads, args.min_run_time),
        "workload_2d_tiled": workload_2d(args.threads, args.min_run_time, backend="tiled"),
        "workload_3d": workload_3d(args.threads, args.min_run_time),
    }
    if not args.skip_memory:
        m64, m128 = peak_memory_bytes(64, args.threads), peak_memory_bytes(128, args.threads)
        results["memory"] = {"peak_64_bytes": m64, "peak_128_bytes": m128, "ratio_128_over_64": m128 / max(m64, 1)}
    w, t, w3 = results["workload_2d"], results["workload_2d_tiled"], results["workload_3d"]
    print(f"threads={args.threads}  statistic={args.statistic}  torch {torch.__version__}")
    print(
        f"2-D P  native: {w['t_na_ms']:.2f} ms | window SDPA {w['t_window_sdpa_ms']:.2f} ms | dense SDPA "
        f"{w['t_dense_sdpa_ms']:.1f} ms | R1 {w['R1']:.2f} | R2 {w['R2']:.2f} | fwd+bwd/fwd {w['na_fwd_bwd_over_fwd']:.2f} "
        f"(window SDPA {w['window_fwd_bwd_over_fwd']:.2f}) | {w['useful_gflops_per_s']:.1f} useful GFLOP/s"
    )
    print(f"2-D P  tiled : {t['t_na_ms']:.2f} ms | R1 {t['R1']:.2f} | R2 {t['R2']:.2f} | fwd+bwd/fwd {t['na_fwd_bwd_over_fwd']:.2f}")
    print(
        f"3-D    native: {w3['t_na_ms']:.2f} ms | window SDPA (scaled) {w3['t_window_sdpa_ms_scaled']:.2f} ms | "
        f"R1 {w3['R1']:.2f} | fwd+bwd/fwd {w3['na_fwd_bwd_over_fwd']:.2f}"
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
