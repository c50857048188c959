"""timm's ``swin_tiny_patch4_window7_224`` after ``attnzoo.swap(model)`` against the original: images/s ratio.

Both models hold the same weights (``swap`` with ``mixer=None`` computes the same function). Inference (eval,
``torch.inference_mode``) and training (forward + backward of a cross-entropy loss, train mode) at 224², fp32, fixed
threads. The two models are timed **interleaved** (A B B A A B …, ``--iters`` calls per turn) for ``--rounds`` rounds;
each round gives one ratio (swapped / original images/s) and the table shows the median with the min–max spread, so
drift on a shared machine hits both sides alike. ``--paths`` adds the attention path alone (block ``_attn`` on the
stage-1 map, unshifted and shifted block) with the padded-canvas token count the shifted windows run on.

    python benchmarks/swap_speed.py --batch 4 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnzoo
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator


def interleaved(calls: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each entry, one value per round, the entries' order alternating between rounds."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for call in calls.values():  # warm-up
        call()
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(iters):
                calls[name]()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def ratio_row(label: str, batch: int, times: dict[str, list[float]]) -> tuple[str, ...]:
    ratios = [o / s for o, s in zip(times["original"], times["swapped"])]
    rate = {n: batch / statistics.median(t) for n, t in times.items()}
    return (
        label,
        f"{rate['original']:.2f}",
        f"{rate['swapped']:.2f}",
        f"{statistics.median(ratios):.3f}",
        f"{min(ratios):.3f}–{max(ratios):.3f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1, help="calls per turn")
    parser.add_argument("--paths", action="store_true", help="also time the stage-1 attention paths alone")
    add_allocator_option(parser)
    args = parser.parse_args()
    print(f"allocator: {benchmark_allocator(args)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    swapped = copy.deepcopy(original)
    report = attnzoo.swap(swapped, strict=True)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                model(x)

        return call

    def train_step(model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return call

    table = Table(
        title=f"swin_tiny_patch4_window7_224, batch {args.batch}, 224², fp32, {args.threads} threads, "
        f"{args.rounds} interleaved rounds × {args.iters} ({len(report)} blocks swapped)"
    )
    for column in ("mode", "timm img/s", "swapped img/s", "ratio (median)", "ratio spread"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for model in (original, swapped):
        model.eval()
    table.add_row(
        *ratio_row(
            "inference",
            args.batch,
            interleaved({"original": infer(original), "swapped": infer(swapped)}, args.rounds, args.iters),
        )
    )
    for model in (original, swapped):
        model.train()
    table.add_row(
        *ratio_row(
            "training",
            args.batch,
            interleaved({"original": train_step(original), "swapped": train_step(swapped)}, args.rounds, args.iters),
        )
    )
    if args.paths:
        for model in (original, swapped):
            model.eval()
        feature = torch.randn(args.batch, 56, 56, 96)

        def attention_path(block: torch.nn.Module) -> Callable[[], None]:
            def call() -> None:
                with torch.inference_mode():
                    block._attn(feature)

            return call

        for index in (0, 1):
            block_o, block_s = original.layers[0].blocks[index], swapped.layers[0].blocks[index]
            shift = block_s.attn.effective_shift((56, 56))
            canvas = [-(-(56 + (7 - s) % 7) // 7) * 7 for s in shift]
            times = interleaved(
                {"original": attention_path(block_o), "swapped": attention_path(block_s)}, args.rounds, args.iters
            )
            label = f"stage-1 attn path, shift {shift[0]}, canvas {canvas[0]}²"
            table.add_row(*ratio_row(label, args.batch, times))
    Console().print(table)


if __name__ == "__main__":
    main()
