"""``attnzoo docs --out DIR [NAMES...]``: the documentation site as static HTML.

The architecture page (``docs/architecture.md``) and a catalogue generated from the registry: for each mechanism its
paper, definition, arguments with defaults, complexity, receptive-field class and picture, parity reference and bench
row (28×28 tokens, dim 32, batch 1, forward). Open ``DIR/index.html`` in a browser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..tools.docs import DOCS_SOURCE, build_docs
from . import UsageError
from .bench_cmd import check_names, check_out_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "docs",
        help="build the documentation site (HTML)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAMES", help="mechanisms to catalogue (default: all registered)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the site into")
    parser.add_argument("--no-bench", action="store_true", help="leave out the bench rows (faster)")
    parser.add_argument("--no-pictures", action="store_true", help="leave out the receptive-field pictures (faster)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = check_names(args.names)
    if not args.out.strip():
        raise UsageError(f"--out must name a folder, got {args.out!r}")
    if not (DOCS_SOURCE / "architecture.md").is_file():
        raise UsageError(f"the docs sources are not here ({DOCS_SOURCE}); run from a source checkout of attnzoo")
    out = check_out_dir(Path(args.out))
    console = Console(stderr=True)
    with console.status("cataloguing") as status:
        written = build_docs(
            out,
            names,
            pictures=not args.no_pictures,
            bench=not args.no_bench,
            progress=lambda name: status.update(f"cataloguing {name}"),
        )
    console.print(f"wrote {len(written)} files; open {out / 'index.html'}")
    return 0
