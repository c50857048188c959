"""Neighborhood-attention backends. ``auto`` picks the first backend of its device's order that can run the problem,
except that on CPU non-overlapping windows go to ``partition`` unless a key_bias or the lse needs scores
(``auto_choice`` says which and why); ``calibration`` can replace that rule by timings on this machine."""

from __future__ import annotations

from ..problem import NAProblem
from . import calibration
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

__all__ = [
    "Backend",
    "BACKENDS",
    "AUTO_ORDER",
    "AUTO_ORDERS",
    "auto_order",
    "auto_choice",
    "select_backend",
    "list_backends",
    "calibration",
]


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
        return auto_choice(problem)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {list(BACKENDS)}")
    chosen = BACKENDS[backend]
    reasons = chosen.not_supported_reasons(problem)
    if reasons:
        raise ValueError(f"backend={backend!r} cannot run this problem: " + "; ".join(reasons))
    return chosen


def auto_choice(problem: NAProblem) -> tuple[Backend, str]:
    """The backend ``backend="auto"`` runs ``problem`` on, and why (a fixed cost rule: no timing, deterministic).

    Rule, from same-run measurements on CPU (interleaved, fp32, 1 and 2 threads, on the kernel with per-worker K/V
    row rings): when stride = kernel and the extents divide into windows, the window partition (SDPA without
    autograd, explicit scores with it) runs the call.
      - Under autograd: t(partition)/t(native) forward+backward 1.03 / 0.94 on Swin 56²×96 windows and 0.60 / 0.55
        on the MaxViT 56²×64 grid (B8; 1 / 2 threads).
      - Forward, dilated windows and rows narrower than the kernel's 8-lane tiles: 0.71 on the grid, 0.92 on 112²
        windows of dilation 2, 0.74 / 0.75 on Swin's 7² stage.
      - Forward, undilated windows on wider rows: the op alone is faster on the kernel (1.56 / 2.44 at Swin's 56²
        stage, 1.07-1.27 at 28², 1.02-1.09 at 14²), but whole models are not: timm Swin-T after ``attnzoo.swap``
        ran 1-3 % slower per image with the kernel there (B4 224², interleaved, 1 and 2 threads), so the rule follows
        the model.
    A key_bias or the lse needs explicit scores with a NaN-safe softmax in the partition, so such calls, like every
    other pattern, go to the first backend of the device's ``auto_order`` that can run. Per-machine calibration
    (``set_auto_calibration``, see ``calibration``) replaces this rule, where more than one fast backend can run a
    call, by the measured fastest for that call; it is off by default so that runs stay reproducible.
    """
    partition = BACKENDS["partition"]
    if problem.device.type == "cpu" and not partition.not_supported_reasons(problem) and partition.uses_sdpa(problem):
        why = "non-overlapping windows without key_bias or return_lse: attention over the window partition"
        return partition, why + " (fused SDPA without autograd, explicit scores with it)"
    skipped = []
    order = auto_order(problem.device.type)
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(problem)
        if not reasons:
            why = f"first backend of the {problem.device.type} auto order {order} that can run the call"
            return BACKENDS[name], why + "".join(f"; {s}" for s in skipped)
        skipped.append(f"{name} declined: " + ", ".join(reasons))
    raise RuntimeError("no backend can run this problem")  # unreachable: the reference accepts everything
