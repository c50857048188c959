"""Layers keep to themselves (issue 17): mechanisms, models, tools, the CLI, training and interop use the engine only
through the public names of ``attnzoo.ops`` (its ``__all__``), never its submodules (``ops.problem``,
``ops.backends``...)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from attnzoo import ops

PACKAGE = Path(ops.__file__).parent.parent
LAYERS = ("mechanisms", "models", "tools", "cli", "training", "interop")
FILES = sorted(path for layer in LAYERS for path in (PACKAGE / layer).rglob("*.py"))


def engine_uses(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for every import from ``attnzoo.ops`` and every ``ops.<name>`` attribute in ``path``."""
    module = "attnzoo." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            names = [alias.name for alias in node.names]
            if source == "attnzoo" and "ops" in names:
                uses.append((node.lineno, "attnzoo.ops"))
            elif source == "attnzoo.ops" or source.startswith("attnzoo.ops."):
                uses.extend((node.lineno, f"{source}.{name}") for name in names)
        elif isinstance(node, ast.Import):
            uses.extend((node.lineno, alias.name) for alias in node.names if alias.name.startswith("attnzoo.ops"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ops":
            uses.append((node.lineno, f"attnzoo.ops.{node.attr}"))
    return uses


def test_the_scan_sees_the_engine_users():
    users = {path.name for path in FILES if engine_uses(path)}
    assert {"neighborhood.py", "mhsa.py", "window.py", "costs.py"} <= users


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_use_only_public_ops_names(path):
    public = {f"attnzoo.ops.{name}" for name in ops.__all__} | {"attnzoo.ops"}
    private = [f"line {line}: {what}" for line, what in engine_uses(path) if what not in public]
    assert not private, f"{path.name} reaches into the engine; export these from attnzoo/ops/__init__.py: {private}"


@pytest.mark.parametrize(
    "path", [p for p in FILES if p.parts[-2] in ("mechanisms", "models")], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_mechanisms_and_models_attend_through_the_engine(path):
    """No direct ``scaled_dot_product_attention``: a call that bypasses ``ops.attention`` escapes the
    ``use_backend`` switch, ``record_backends`` and ``record_attention`` (and the bench reference check)."""
    direct = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "scaled_dot_product_attention"
    ]
    assert not direct, f"{path.name} calls scaled_dot_product_attention directly on lines {direct}; use ops.attention"
