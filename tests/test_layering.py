"""The package's layers import only downwards: ops → mechanisms → models → tools → training → cli.

Every module under ``attnzoo/`` is parsed (``ast``, so imports inside functions and ``TYPE_CHECKING`` blocks count
too) and each ``import`` of an ``attnzoo`` module is resolved to the layer it lands in.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnzoo"

# What each layer may import besides itself. ``interop`` (adapters that put mechanisms into other libraries' models)
# sits beside ``tools``: it needs mechanisms and models, and nothing above them needs it.
ALLOWED: dict[str, set[str]] = {
    "ops": set(),
    "mechanisms": {"ops"},
    "models": {"ops", "mechanisms"},
    "interop": {"ops", "mechanisms", "models"},
    "tools": {"ops", "mechanisms", "models"},
    "training": {"ops", "mechanisms", "models", "tools"},
    "cli": {"ops", "mechanisms", "models", "tools", "training"},
}
# The package root (``attnzoo/__init__.py``: the public facade, and ``__main__.py``: ``python -m attnzoo``) sits above
# every layer; no layer may import it, since importing it imports them all.
ROOT = "attnzoo"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> list[str]:
    """The dotted package that relative imports in ``path`` start from, as parts (``["attnzoo", "ops"]``)."""
    parts = ["attnzoo", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1]  # a package's __init__ and its other modules share the package


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """``(line, dotted parts)`` of every ``attnzoo`` module (or name in one) that ``path`` imports."""
    package = _package_of(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == ROOT:
                module = node.module.split(".")
            else:
                continue
            # each imported name (``from .. import models`` imports the subpackage ``models``)
            found += [(node.lineno, module + [a.name]) for a in node.names]
    return found


def layer_of(parts: list[str]) -> str:
    """The layer a module's dotted parts belong to (``ROOT`` for the package itself and its top-level files)."""
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ROOT


def violations() -> list[str]:
    found = []
    for path in _modules():
        here = layer_of(_package_of(path))
        if here == ROOT:
            continue
        for line, target in imported_modules(path):
            there = layer_of(target)
            if there != here and there not in ALLOWED[here]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {'.'.join(target)} ({there})")
    return found


def test_every_layer_is_known():
    """A new top-level subpackage must be placed in the layer order before it can pass this test."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED)


def test_no_module_imports_a_higher_layer():
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "where", "expected"),
    [
        ("from ..training import train", "models/x.py", ["attnzoo", "training", "train"]),
        ("from .. import tools", "mechanisms/x.py", ["attnzoo", "tools"]),
        ("import attnzoo.cli.bench_cmd", "ops/x.py", ["attnzoo", "cli", "bench_cmd"]),
        ("from ...ops import count_flops", "ops/backends/x.py", ["attnzoo", "ops", "count_flops"]),
        ("from . import problem", "ops/__init__.py", ["attnzoo", "ops", "problem"]),
    ],
)
def test_imports_are_resolved_to_their_module(tmp_path, monkeypatch, source, where, expected):
    """The checker itself: relative and absolute imports land on the right module (so a violation cannot hide)."""
    root = tmp_path / "attnzoo"
    path = root / where
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    assert imported_modules(path) == [(1, expected)]


def test_a_planted_upward_import_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "attnzoo"
    for layer in ALLOWED:
        (root / layer).mkdir(parents=True)
        (root / layer / "__init__.py").write_text("")
    (root / "models" / "bad.py").write_text("def f():\n    from ..training import train\n")
    (root / "cli" / "fine.py").write_text("from ..training import train\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    assert violations() == ["attnzoo/models/bad.py:2 (models) imports attnzoo.training.train (training)"]
