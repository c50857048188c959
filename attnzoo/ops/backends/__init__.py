"""Neighborhood-attention backends. ``auto`` picks the first backend of its device's order that can run the problem."""

from __future__ import annotations

from ..problem import NAProblem
from .base import Backend
from .flex import FlexBackend
from .native import NativeBackend
from .natten import NattenBackend
from .partition import PartitionBackend
from .reference import ReferenceBackend
from .tiled import TiledBackend

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (NativeBackend(), PartitionBackend(), TiledBackend(), FlexBackend(), NattenBackend(), ReferenceBackend())
}
# per device type; any other device uses the CPU order (native declines it, the portable backends follow)
AUTO_ORDERS = {
    "cpu": ("native", "partition", "tiled", "reference"),
    "cuda": ("natten", "flex", "partition", "tiled", "reference"),
}
AUTO_ORDER = AUTO_ORDERS["cpu"]

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "AUTO_ORDERS", "auto_order", "select_backend", "list_backends"]


def list_backends() -> list[str]:
    return list(BACKENDS)


def auto_order(device: str) -> tuple[str, ...]:
    """The backends ``backend="auto"`` tries, in order, for a device type ("cpu", "cuda", ...)."""
    return AUTO_ORDERS.get(device, AUTO_ORDER)


def select_backend(backend: str, problem: NAProblem) -> Backend:
    """The backend to run ``problem``: an explicit name runs or raises with every reason; never a silent fallback."""
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a string: 'auto' or one of {list(BACKENDS)}")
    if backend == "auto":
        for name in auto_order(problem.device.type):
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
