"""Training throughput of the ``tiny`` backbone per mixer, and the test accuracy each reaches on Fashion-MNIST.

Throughput: one AdamW training step on a batch of 128 28×28 images, ``torch.utils.benchmark`` median, fixed threads;
reported as images/s and as a ratio to the first mixer measured in the same run (the machine is shared, absolute
times drift). Accuracy: ``attnzoo.training.train`` for ``--epochs`` on the real Fashion-MNIST (``--limit-train`` to
shorten), same seed for every mixer.

    python benchmarks/train_throughput.py --mixers neighborhood,window,mhsa --threads 2            # both parts
    python benchmarks/train_throughput.py --skip-accuracy                                          # throughput only
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from attnzoo import models
from attnzoo.tools.costs import add_allocator_option, benchmark_allocator, median_latency
from attnzoo.training import TrainConfig, train


def step_rate(mixer: str, batch: int, min_run_time: float, threads: int) -> float:
    """Training images/s of one forward+backward+AdamW step of ``tiny`` with ``mixer`` in every stage."""
    torch.manual_seed(0)
    model = models.create("tiny", mixer, num_classes=10, in_chans=1, img_size=28)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return batch / median_latency(step, threads=threads, min_run_time=min_run_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="neighborhood,window,mhsa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--min-run-time", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit-train", type=int, help="shorten the accuracy runs (default: all 60k images)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    add_allocator_option(parser)
    args = parser.parse_args()
    print(f"allocator: {benchmark_allocator(args)}")
    torch.set_num_threads(args.threads)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    rows = {m: {"train_images_per_s": step_rate(m, args.batch, args.min_run_time, args.threads)} for m in mixers}
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            for m in mixers:
                config = TrainConfig(
                    mixers=[m] * 4, out=str(Path(tmp) / m), epochs=args.epochs, limit_train=args.limit_train
                )
                result = train(config, show_progress=True)
                rows[m].update(test_accuracy=result.test_accuracy, loop_images_per_s=result.train_images_per_s)
    yard = rows[mixers[0]]["train_images_per_s"]
    table = Table(title=f"tiny, batch {args.batch}, {args.threads} threads (ratio: same run, vs {mixers[0]})")
    for column in ("mixer", "train img/s", "ratio", "test acc", "img/s in training loop"):
        table.add_column(column, justify="left" if column == "mixer" else "right")
    for m, r in rows.items():
        acc = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "-"
        loop = f"{r['loop_images_per_s']:,.0f}" if "loop_images_per_s" in r else "-"
        table.add_row(m, f"{r['train_images_per_s']:,.0f}", f"{r['train_images_per_s'] / yard:.2f}", acc, loop)
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
