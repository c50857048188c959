"""``attnzoo viz``: pictures of what a mechanism sees (PNG).

``receptive-field NAMES... [--size 28] [--query Y,X ...] [--all]``: per mechanism the gradient receptive field
Σ|∂y[q]/∂x| over channels of each query, and for attention mechanisms the exact attention weights of that query;
``--all`` draws one grid of every registered mechanism.
``attention-map NAME --image astronaut|chelsea|coffee|PATH [--checkpoint DIR]``: attention weights over a photo.
Mechanisms are built with their registry defaults (zero-initialised parameters given small random values).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from ..mechanisms import list_mechanisms, mechanism_info
from ..models.saving import atomic_write
from ..tools.images import PHOTOS, load_photo
from ..tools.workload import PrepareError
from . import UsageError, out_path
from .bench_cmd import check_names, check_positive


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz",
        help="receptive fields and attention maps as PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    rf = kinds.add_parser("receptive-field", help="gradient receptive field and exact attention per query")
    rf.add_argument("names", nargs="*", metavar="NAMES", help="mechanisms to draw")
    rf.add_argument("--size", type=int, default=28, help="token grid side (default 28)")
    rf.add_argument("--dim", type=int, default=32, help="channels (default 32)")
    rf.add_argument("--query", nargs="+", default=None, metavar="Y,X", help="query token(s) (default: the centre)")
    rf.add_argument("--all", action="store_true", help="one grid picture of every registered mechanism")
    rf.add_argument("--out", type=out_path, default=None, metavar="FILE.png", help="default receptive-field.png")
    rf.set_defaults(run=run_receptive_field)

    am = kinds.add_parser("attention-map", help="attention weights of one query over a photo")
    am.add_argument("name", metavar="NAME")
    am.add_argument("--image", default="astronaut", help=f"{'|'.join(PHOTOS)} (skimage.data) or a file path")
    am.add_argument("--checkpoint", default=None, metavar="DIR", help="a trained run folder (attnzoo.models.load)")
    am.add_argument("--size", type=int, default=16, help="token grid side without --checkpoint (default 16)")
    am.add_argument("--dim", type=int, default=32, help="channels without --checkpoint (default 32)")
    am.add_argument("--query", default=None, metavar="Y,X", help="query token (default: the centre)")
    am.add_argument("--out", type=out_path, default=None, metavar="FILE.png", help="default attention-map-NAME.png")
    am.set_defaults(run=run_attention_map)


def parse_query(text: str, size: int | None) -> tuple[int, int]:
    """``"3,4"`` → ``(3, 4)``, checked against a ``size × size`` grid when ``size`` is given."""
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--query {text!r} must be two integers Y,X, e.g. 14,14") from None
    if size is not None and not (0 <= y < size and 0 <= x < size):
        raise UsageError(f"--query {text!r} is outside the {size}×{size} token grid (0 ≤ Y, X < {size})")
    return (y, x)


def _output(path: Path | None, default: str) -> Path:
    """The PNG path, with its folder created and checked writable before any work."""
    path = Path(default) if path is None else path
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {str(path)!r} must name a .png file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {str(path)!r}: cannot create its folder ({exc.strerror or exc})") from None
    if path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a folder, not a file path")
    try:  # create (and remove) a new file next to it: the real test of writability, following no link
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".attnzoo-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {str(path)!r} is not a writable file path ({exc.strerror or exc})") from None
    return path


def run_receptive_field(args: argparse.Namespace) -> int:
    from ..tools.figures import receptive_field_figure, receptive_field_grid
    from ..tools.receptive import mechanism_view

    check_positive("--size", args.size, 2)
    check_positive("--dim", args.dim)
    if not args.names and not args.all:
        raise UsageError("name at least one mechanism (see `attnzoo list`) or pass --all")
    names = check_names(args.names) if args.names else []
    if args.all:
        names = list(dict.fromkeys(names + list_mechanisms()))
    queries = [parse_query(q, args.size) for q in (args.query or [f"{args.size // 2},{args.size // 2}"])]
    out = _output(args.out, "receptive-field.png")
    console = Console()
    views = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("receptive fields", total=len(names))
        for name in names:
            progress.update(task, description=f"receptive field of {name}")
            try:
                views.append(
                    mechanism_view(name, args.size, args.dim, queries, strict=not args.all, attention=not args.all)
                )
            except PrepareError as exc:
                raise UsageError(f"{name}: {exc} (try another --size)") from None
            progress.advance(task)
    if args.all:
        atomic_write(out, lambda p: receptive_field_grid(views, args.size, p))
    else:
        atomic_write(out, lambda p: receptive_field_figure(views, args.size, p))
    failed = [v.name for v in views if v.error]
    skipped = f" ({len(failed)} could not run at {args.size}: {', '.join(failed)})" if failed else ""
    console.print(f"wrote {out}{skipped}")
    return 1 if failed else 0


def run_attention_map(args: argparse.Namespace) -> int:
    (name,) = check_names([args.name])
    check_positive("--size", args.size, 2)
    check_positive("--dim", args.dim)
    if not mechanism_info(name).is_attention:
        raise UsageError(f"{name!r} is not an attention mechanism (it has no attention weights); try receptive-field")
    from ..tools.attention_map import trained_photo_attention, untrained_photo_attention
    from ..tools.figures import attention_overlay_figure

    query = None if args.query is None else parse_query(args.query, None if args.checkpoint else args.size)
    out = _output(args.out, f"attention-map-{name}.png")
    try:
        photo = load_photo(args.image)
        if args.checkpoint is not None:
            result = trained_photo_attention(name, photo, args.checkpoint, query=query)
        else:
            result = untrained_photo_attention(name, photo, size=args.size, dim=args.dim, query=query)
    except PrepareError as exc:
        raise UsageError(f"{name}: {exc} (try another --size)") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not result.maps:
        raise UsageError(f"{name} made no attention call that record_attention could see")
    atomic_write(
        out, lambda p: attention_overlay_figure(result.photo, result.maps, result.grid, result.query, result.title, p)
    )
    Console().print(f"wrote {out}")
    return 0
