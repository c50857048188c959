"""Images/s of ``nat_tiny`` (attnzoo) against timm's ``swin_tiny_patch4_window7_224``: inference and training.

Batch 8, 224², fp32, fixed threads. Inference: ``model.eval()`` under ``torch.inference_mode``. Training: one forward
and backward of the summed logits in train mode (stochastic depth off in both models, so both run every block).
The two models are timed in alternation (``--repeats`` rounds of ``--iters`` calls each, after a warm-up), so drift
of the shared machine hits both; the ratio nat/swin is reported as the median over rounds with its min–max spread.

    PYTHONPATH=$PWD python benchmarks/models_speed.py --threads 2 --repeats 5 --iters 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch

from attnzoo import models
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator


def timed(fn: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def steps(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    def train() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return {"inference": infer, "training": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--json", help="also write the results here")
    add_allocator_option(parser)
    args = parser.parse_args()
    print(f"allocator: {benchmark_allocator(args)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    contenders = {
        "nat_tiny": models.create("nat_tiny", drop_path_rate=0.0),
        "swin_tiny_patch4_window7_224": timm.create_model("swin_tiny_patch4_window7_224", drop_path_rate=0.0),
    }
    results = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        fns = {name: steps(model, x)[mode] for name, model in contenders.items()}
        for fn in fns.values():
            fn()  # warm-up (kernel JIT, allocator)
        seconds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                seconds[name].append(timed(fn, args.iters))
        nat, swin = seconds["nat_tiny"], seconds["swin_tiny_patch4_window7_224"]
        ratios = [s / n for n, s in zip(nat, swin)]  # images/s of nat over images/s of swin
        results[mode] = {
            "nat_tiny_images_per_s": args.batch / statistics.median(nat),
            "swin_tiny_images_per_s": args.batch / statistics.median(swin),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        r = results[mode]
        print(
            f"{mode:9s}  nat_tiny {r['nat_tiny_images_per_s']:6.1f} img/s   swin_tiny {r['swin_tiny_images_per_s']:6.1f} img/s"
            f"   ratio {r['ratio_median']:.2f} (min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f}, {args.repeats} rounds)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"threads": args.threads, "batch": args.batch, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
