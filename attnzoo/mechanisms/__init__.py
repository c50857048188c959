"""Every mechanism is one module file in this package that registers itself with ``@register_mechanism``.

Files are discovered automatically (``load_all``), so adding a mechanism needs no edit anywhere else; files whose
name starts with ``_`` hold shared building blocks.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._base import BlockState
from .registry import MechanismInfo, create, list_families, list_mechanisms, mechanism_info, register_mechanism

__all__ = [
    "BlockState",
    "MechanismInfo",
    "create",
    "list_families",
    "list_mechanisms",
    "mechanism_info",
    "register_mechanism",
    "load_all",
]

_loaded = False


def load_all() -> None:
    """Import every mechanism module once (registration happens at import)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_") and module.name != "registry":
            importlib.import_module(f"{__name__}.{module.name}")
