"""Neighborhood-attention backends. ``auto`` picks the first in ``AUTO_ORDER`` that can run the problem."""

from __future__ import annotations

from ..problem import NAProblem
from .base import Backend
from .native import NativeBackend
from .partition import PartitionBackend
from .reference import ReferenceBackend
from .tiled import TiledBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (NativeBackend(), PartitionBackend(), TiledBackend(), ReferenceBackend())}
AUTO_ORDER = ("native", "partition", "tiled", "reference")

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "select_backend", "list_backends"]


def list_backends() -> list[str]:
    return list(BACKENDS)


def select_backend(backend: str, problem: NAProblem) -> Backend:
    """The backend to run ``problem``: an explicit name runs or raises with every reason; never a silent fallback."""
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a string: 'auto' or one of {list(BACKENDS)}")
    if backend == "auto":
        for name in AUTO_ORDER:
            if not BACKENDS[name].not_supported_reasons(problem):
                return BACKENDS[name]
        raise RuntimeError("no backend can run this problem")  # unreachable: the reference accepts everything
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {list(BACKENDS)}")
    chosen = BACKENDS[backend]
    reasons = chosen.not_supported_reasons(problem)
    if reasons:
        raise ValueError(f"backend={backend!r} cannot run this problem: " + "; ".join(reasons))
    return chosen
