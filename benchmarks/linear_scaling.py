"""Forward time vs token count for the linear / recurrent / scan / routed mechanisms, against ``mhsa`` in the same run.

Median forward time (``torch.utils.benchmark``; with ``--clock cpu`` the least CPU time of the one computing
thread, which other jobs on a shared machine inflate far less) at 28², 56², 112² tokens, dim 64, batch 1, fixed
threads; the fitted log-log exponent (time ∝ N^p) per mechanism and the ratio to ``mhsa`` at every size. Absolute
times drift on shared machines, so read the ratios.

    python benchmarks/linear_scaling.py --out linear_scaling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.utils.benchmark as benchmark

import attnzoo
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator, fit_exponent

MECHANISMS: dict[str, dict] = {
    "mhsa": {"num_heads": 2},
    "linear": {"num_heads": 2},
    "agent": {"num_heads": 2},
    "softmax_free": {"num_heads": 2},
    "retention": {"num_heads": 2, "mode": "chunkwise"},
    "lightning": {"num_heads": 2, "mode": "chunkwise"},
    "gated_linear_2d": {"num_heads": 2},
    "bi_level_routing": {"num_heads": 2},
    "routing": {"num_heads": 2},
    "rank_augmented_linear": {"num_heads": 2},
    "focused_linear": {"num_heads": 2},
    "enhanced_linear": {"num_heads": 2},
    "scattered_linear": {"num_heads": 2},
    "noncausal_ssd": {},
    "cross_scan_2d": {},
    "bidirectional_ssm": {},
    "multiscale_scan": {},
    "multihead_scan": {},
    "local_attention_mamba": {"num_heads": 2},
    "hyena_nd": {},
}


def measure(name: str, kwargs: dict, side: int, dim: int, threads: int, min_run_time: float, clock: str) -> float:
    """Seconds of one forward: the median wall clock (``torch.utils.benchmark``) or, with ``clock="cpu"``, the least
    CPU time of the calling thread over the repeats (one thread; other jobs on a shared machine only ever add time —
    cache and memory-bandwidth contention — so the minimum is the robust estimate)."""
    torch.manual_seed(0)
    module = attnzoo.create(name, dim, **kwargs).eval()
    x = torch.randn(1, side, side, dim)
    if clock == "wall":
        timer = benchmark.Timer(
            stmt="with torch.no_grad(): module(x)",
            globals={"module": module, "x": x, "torch": torch},
            num_threads=threads,
        )
        return timer.blocked_autorange(min_run_time=min_run_time).median
    torch.set_num_threads(1)
    samples: list[float] = []
    with torch.no_grad():
        module(x)  # warm-up
        while sum(samples) < min_run_time or len(samples) < 3:
            start = time.thread_time()
            module(x)
            samples.append(time.thread_time() - start)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[28, 56, 112])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (forces 1 thread)"
    )
    parser.add_argument("--only", nargs="+", default=None, help="subset of mechanisms (mhsa is always kept)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_allocator_option(parser)
    args = parser.parse_args()
    print(f"allocator: {benchmark_allocator(args)}")
    if args.clock == "cpu":
        args.threads = 1  # thread CPU time measures the calling thread only

    names = list(MECHANISMS) if args.only is None else ["mhsa"] + [n for n in args.only if n != "mhsa"]
    tokens = [s * s for s in args.sides]
    times: dict[str, list[float]] = {}
    for name in names:
        times[name] = [
            measure(name, MECHANISMS.get(name, {}), s, args.dim, args.threads, args.min_run_time, args.clock)
            for s in args.sides
        ]
    results = {
        name: {
            "median_s": t,
            "ratio_to_mhsa": [a / b for a, b in zip(t, times["mhsa"])],
            "exponent": fit_exponent(tokens, t),
            "kwargs": MECHANISMS.get(name, {}),
        }
        for name, t in times.items()
    }

    header = f"{'mechanism':<18}" + "".join(f"{f'{s}² ms':>11}{'/mhsa':>7}" for s in args.sides) + f"{'exponent':>10}"
    print(
        f"dim={args.dim}, batch=1, threads={args.threads}, clock={args.clock}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(header)
    for name, r in results.items():
        cells = "".join(f"{t * 1e3:>11.2f}{ratio:>7.2f}" for t, ratio in zip(r["median_s"], r["ratio_to_mhsa"]))
        print(f"{name:<18}{cells}{r['exponent']:>10.2f}")
    if args.out:
        meta = {
            "sides": args.sides,
            "tokens": tokens,
            "dim": args.dim,
            "batch": 1,
            "threads": args.threads,
            "clock": args.clock,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
