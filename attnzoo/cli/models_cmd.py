"""``attnzoo models [--family F]``: every published model with its paper's parameters and MACs next to the measured ones."""

from __future__ import annotations

import argparse

from rich.table import Table

from ..models import list_families, list_models, model_info
from . import UsageError
from .bench_cmd import wide_console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="published backbones: paper vs measured params and MACs", description=__doc__
    )
    parser.add_argument("--family", metavar="F", help="only models of family F (e.g. nat, dinat)")
    parser.set_defaults(run=run)


def _signed_percent(error: float) -> str:
    return f"{100 * error:+.1f}%"


def run(args: argparse.Namespace) -> int:
    families = list_families()
    if args.family is not None and args.family not in families:
        raise UsageError(f"--family {args.family!r} is unknown; families: {', '.join(families)}")
    names = [n for n in list_models(args.family) if n not in list_models("arena")]
    table = Table(title=f"attnzoo published models ({len(names)}): MACs at 224², 1000 classes", show_lines=False)
    columns = (
        "name",
        "family",
        "params (paper)",
        "params (measured)",
        "Δ",
        "GMACs (paper)",
        "GMACs (measured)",
        "Δ",
        "top-1",
        "source",
        "note",
    )
    for column in columns:
        table.add_column(column, style="bold cyan" if column == "name" else "", overflow="fold")
    for name in names:
        info = model_info(name)
        table.add_row(
            name,
            info.family,
            f"{info.paper_params_m:g}M",
            f"{info.params / 1e6:.2f}M",
            _signed_percent(info.params_error),
            f"{info.paper_gmacs:g}",
            f"{info.macs / 1e9:.2f}",
            _signed_percent(info.macs_error),
            f"{info.top1:.1f}",
            info.source,
            info.note or "—",
        )
    wide_console().print(table)
    return 0
