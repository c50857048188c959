"""``attnzoo arena``: train the same backbone once per mechanism (same data, same seed) and compare them.

Writes ``arena.csv``, ``arena.json`` and ``arena.png`` (accuracy vs FLOPs) into ``--out`` and prints the table.
FLOPs come from ``attnzoo.ops.count_flops`` (``torch.utils.flop_counter`` plus the engine's fused ops and
FFTs; other operators without a FLOP formula count as 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..training import TrainConfig
from ..training.arena import run_arena
from . import UsageError
from .train_cmd import add_data_options, check_out, num_stages, set_threads, split_names, training_errors


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "arena",
        help="train one backbone per mechanism on the same data and compare accuracy, FLOPs and speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mixers", required=True, help="comma-separated mechanisms; each is used in every stage")
    add_data_options(p, defaults=True)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-eval", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="output folder (default runs/arena-<time>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    set_threads(args.threads)
    check_out(args.out)
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} must be in [0, 2**63)")
    mixers = split_names(args.mixers)
    out = args.out or str(Path("runs") / f"arena-{time.strftime('%Y%m%d-%H%M%S')}")
    base = TrainConfig(
        mixers=mixers[:1] * num_stages(args.size),
        out=out,
        size=args.size,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_eval=args.limit_eval,
    )
    with training_errors():
        base.validate()
        rows = run_arena(mixers, base, show_progress=not args.no_progress)
    table = Table(title=f"arena: {args.size} on {args.dataset}, {args.epochs} epoch(s), seed {args.seed}")
    for column in ("mixer", "test acc", "params", "GFLOPs/img", "train img/s", "infer img/s"):
        table.add_column(column, justify="left" if column == "mixer" else "right")
    for r in sorted(rows, key=lambda r: -r["test_accuracy"]):
        table.add_row(
            r["mixer"],
            f"{r['test_accuracy']:.4f}",
            f"{r['parameters']:,}",
            f"{r['gflops_per_image']:.4f}",
            f"{r['train_images_per_s']:,.0f}",
            f"{r['infer_images_per_s']:,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"written: {out}/arena.csv, arena.json, arena.png (FLOPs: attnzoo.ops.count_flops)")
    return 0
