"""``attnzoo bench [NAMES...]``: parameters, FLOPs, peak memory, latency and throughput of mechanisms.

Every mechanism is built with its registry defaults for a ``size × size`` grid of ``dim``-channel tokens (falling
back to the registry test configuration when the defaults cannot take it; the check column says so). With
``--sizes`` the latency and memory are also measured at each size and a log-log exponent fitted (≈ 1 linear or
local, ≈ 2 global). ``--out DIR`` writes bench.csv, bench.json, PNG plots and index.html.
Attention mechanisms whose constructor takes ``head_dim`` all get ``--head-dim`` (default 32) so latencies compare
like with like (``--head-dim 0``: registry defaults); the table title says which was used.
Threads default to 1 so figures are stable on shared machines and comparable across them; pass ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..mechanisms import list_mechanisms, mechanism_info
from ..tools.bench import DEFAULT_SWEEP, BenchConfig, BenchRow, bench_mechanism, yardstick_latency
from ..tools.report import SCALING_COLUMNS, TABLE_COLUMNS, table_cells, write_report
from . import UsageError, out_path

DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure cost: params, FLOPs, memory, latency, scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAMES", help="mechanisms to measure (default: all registered)")
    parser.add_argument("--size", type=int, default=56, help="token grid side (default 56: 56×56 tokens)")
    parser.add_argument("--dim", type=int, default=64, help="channels (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    parser.add_argument(
        "--head-dim",
        type=int,
        default=32,
        help="head width for every attention mechanism that takes head_dim (default 32; 0: registry defaults)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (default 1)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--sizes", default=None, metavar="S1,S2,...",
                        help="grid sides for the scaling sweep, e.g. 14,28,56,112 "
                        f"(default: none; {','.join(map(str, DEFAULT_SWEEP))} with --out)")  # fmt: skip
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.3,
        help="seconds of timing per mechanism at --size (default 0.3; a third per sweep size)",
    )
    parser.add_argument(
        "--out", type=out_path, default=None, metavar="DIR", help="write CSV, JSON, PNG plots, index.html"
    )
    parser.set_defaults(run=run)


def check_positive(flag: str, value: int, minimum: int = 1) -> int:
    """``value`` when it is at least ``minimum``; otherwise a usage error naming ``flag``."""
    if value < minimum:
        raise UsageError(f"{flag} {value} must be at least {minimum}")
    return value


def parse_sizes(text: str | None, with_out: bool) -> tuple[int, ...]:
    """``"14,28,56"`` → ``(14, 28, 56)``; ``None`` → the tool's default sweep when writing a report, else none."""
    if text is None:
        return DEFAULT_SWEEP if with_out else ()
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--sizes {text!r} must be comma-separated integers, e.g. 14,28,56") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--sizes {text!r} must list positive integers, e.g. 14,28,56")
    return tuple(sorted(set(sizes)))


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device!r}: MPS is not available on this machine")
    return str(dev)


def check_names(names: list[str]) -> list[str]:
    """The requested names (all registered when empty); an unknown name is a usage error with suggestions."""
    if not names:
        return list_mechanisms()
    for name in names:
        try:
            mechanism_info(name)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
    return list(dict.fromkeys(names))


def check_out_dir(out: Path) -> Path:
    """Create ``out`` and make sure it is writable, before any measuring."""
    if not str(out).strip():
        raise UsageError("--out '' must name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".attnzoo-write-test.")  # a new file: never follows a link
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r} is not a writable directory ({exc.strerror or exc})") from None
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        size=check_positive("--size", args.size),
        dim=check_positive("--dim", args.dim),
        batch=check_positive("--batch", args.batch),
        threads=check_positive("--threads", args.threads),
        dtype=args.dtype,
        device=check_device(args.device),
        backward=args.backward,
        sizes=parse_sizes(args.sizes, args.out is not None),
        min_run_time=max(0.01, args.min_run_time),
        sweep_min_run_time=max(0.01, args.min_run_time / 3),
        head_dim=check_positive("--head-dim", args.head_dim, 0) or None,
    )


# Live tensors of one mechanism call relative to its input (input, q/k/v, intermediates, output, and gradients with
# --backward): a deliberately low multiplier, so that the refusal below only stops runs that cannot fit.
ACTIVATION_COPIES = 8


def available_memory(device: str) -> int | None:
    """Bytes that a run on ``device`` may still allocate (``None`` when unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_memory(cfg: BenchConfig) -> None:
    """Refuse, before allocating anything, a grid whose activations alone cannot fit (with the estimate)."""
    side = max((cfg.size, *cfg.sizes))
    itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    needed = ACTIVATION_COPIES * (2 if cfg.backward else 1) * cfg.batch * side * side * cfg.dim * itemsize
    available = available_memory(cfg.device)
    if available is not None and needed > available:
        raise UsageError(
            f"a {side}×{side} grid (batch {cfg.batch}, dim {cfg.dim}, {cfg.dtype}) needs at least {needed / 2**30:,.1f} GiB "
            f"of activations, more than the {available / 2**30:,.1f} GiB available on {cfg.device}; use a smaller --size"
        )


def results_table(rows: list[BenchRow], cfg: BenchConfig, seconds: float, yardstick: float) -> Table:
    with_scaling = bool(cfg.sizes)
    mode = "forward+backward" if cfg.backward else "forward"
    table = Table(
        title=f"attnzoo bench: {cfg.size}×{cfg.size} tokens, dim {cfg.dim}, batch {cfg.batch}, {cfg.dtype}, "
        f"{cfg.device}, {cfg.threads} thread(s), {mode}, "
        + (f"head_dim {cfg.head_dim} where taken" if cfg.head_dim else "registry head widths"),
        caption=f"{len(rows)} mechanisms in {seconds:.0f} s; × SDPA = latency / dense SDPA over all tokens "
        f"({yardstick * 1e3:.2f} ms, measured in this run)"
        + (f"; exponents fitted over sizes {', '.join(map(str, cfg.sizes))}" if with_scaling else ""),
    )
    columns = list(TABLE_COLUMNS) + (list(SCALING_COLUMNS) if with_scaling else [])
    for col in columns:
        left = col in ("mechanism", "family", "check")
        table.add_column(col, justify="left" if left else "right", overflow="fold", no_wrap=col == "mechanism")
    for row in rows:
        table.add_row(*table_cells(row, with_scaling), style=None if row.ok else "red")
    return table


def wide_console() -> Console:
    """Rich console; 200 columns when writing to a file or pipe (rich would assume 80) so tables stay readable."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    names = check_names(args.names)
    check_memory(cfg)
    if args.out is not None:
        check_out_dir(args.out)
    console = wide_console()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    rows: list[BenchRow] = []
    start = time.perf_counter()
    try:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("benchmarking", total=len(names) + 1)
            progress.update(task, description=f"{'yardstick: dense SDPA':<37}")
            yardstick = yardstick_latency(cfg)
            progress.advance(task)
            for name in names:
                progress.update(task, description=f"benchmarking {name:<24}")
                rows.append(bench_mechanism(name, cfg, yardstick))
                progress.advance(task)
    finally:
        torch.set_num_threads(previous_threads)
    console.print(results_table(rows, cfg, time.perf_counter() - start, yardstick))
    if args.out is not None:
        try:
            paths = write_report(rows, cfg, args.out, yardstick)
        except OSError as exc:
            raise UsageError(f"--out {str(args.out)!r}: cannot write the report ({exc.strerror or exc})") from None
        console.print(f"wrote {len(paths)} files to {os.fspath(args.out)} (open {os.fspath(args.out / 'index.html')})")
    failed = [r.name for r in rows if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} mechanism(s) failed: {', '.join(failed)}[/red]")
        return 1
    return 0
