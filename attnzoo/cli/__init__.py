"""``attnzoo`` command line: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``.

A subcommand module registers its parser with ``parser.set_defaults(run=run)``; ``run`` returns the exit code.
Errors a user can fix (``UsageError``) print one line and exit with code 2, without a traceback; faults of the
environment (``OSError``: disk full, read-only file system) print one line and exit with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns about a missing CUDA runtime on CPU-only
# machines; that line is noise for every attnzoo command.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

SUBCOMMANDS = ("list", "bench", "viz", "train", "arena", "models", "docs")

__all__ = ["main", "UsageError", "SUBCOMMANDS", "out_path"]


class UsageError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``attnzoo COMMAND: error: ...`` (exit code 2), no usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def out_path(text: str) -> Path:
    """An ``--out`` argument: a non-empty path (``--out ""`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("--out '' must name a file or folder")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnzoo", description="Compare attention mechanisms for vision by cost and by what they see."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}_cmd":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"attnzoo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an environmental fault (disk full, read-only file system, ...): one line, exit 1
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"attnzoo {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
