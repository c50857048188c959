"""``attnzoo list [--family F]``: every registered mechanism with its paper, year, complexity, receptive field,
slot and reference."""

from __future__ import annotations

import argparse

from rich.table import Table

from ..mechanisms import list_families, list_mechanisms, mechanism_info
from . import UsageError
from .bench_cmd import wide_console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the registered mechanisms", description=__doc__)
    parser.add_argument("--family", metavar="F", help="only mechanisms of family F")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.family is not None and args.family not in list_families():
        raise UsageError(f"--family {args.family!r} is unknown; families: {', '.join(list_families())}")
    names = list_mechanisms(args.family)
    table = Table(title=f"attnzoo mechanisms ({len(names)})", show_lines=False)
    for column, style in (
        ("name", "bold cyan"),
        ("family", ""),
        ("paper", ""),
        ("year", ""),
        ("complexity", ""),
        ("sees", ""),
        ("slot", ""),
        ("reference", "dim"),
    ):
        table.add_column(column, style=style, overflow="fold")
    for name in names:
        info = mechanism_info(name)
        table.add_row(
            name,
            info.family,
            info.paper,
            str(info.year),
            info.complexity,
            info.receptive_field,
            info.slot,
            info.reference or "—",
        )
    wide_console().print(table)
    return 0
