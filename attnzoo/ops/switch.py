"""One engine-wide backend switch (``use_backend``) and a record of which backend ran each engine call
(``record_backends``).

Precedence, as in timm's fused-attention switch: a per-call ``backend=`` other than ``"auto"`` (a module's
``backend`` argument included) wins; otherwise the innermost ``use_backend`` block decides; otherwise ``auto``
dispatch. Both live in context variables: each thread starts with neither, and an asyncio task sees the values of
the context it was created in, so concurrent callers never force or record each other's calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

from .backends import BACKENDS, Backend, select_backend
from .problem import NAProblem

__all__ = ["BackendRun", "record_backends", "resolve_backend", "use_backend"]

_FORCED: ContextVar[str] = ContextVar("attnzoo_use_backend", default="auto")
_RUNS: ContextVar[list | None] = ContextVar("attnzoo_record_backends", default=None)


class BackendRun(NamedTuple):
    """One engine call: ``op`` is ``"neighborhood"`` or ``"attention"``, ``backend`` the backend that ran it
    (a name of ``list_backends()``, or ``"sdpa"`` for the dense op's fused ``scaled_dot_product_attention``, or
    ``"explicit"`` for the plain matmul-softmax-matmul ``auto`` takes on CPU where it beats SDPA; the explicit-scores
    path ``auto`` takes for ``return_lse`` is the ``"reference"`` computation and says so)."""

    op: str
    backend: str


def _check_name(name: str, argument: str = "name") -> str:
    allowed = ["auto", *BACKENDS]
    if not isinstance(name, str):
        raise TypeError(f"{argument}={name!r} must be a string, one of {allowed}")
    if name not in allowed:
        raise ValueError(f"{argument}={name!r} is not a backend; choose one of {allowed}")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run every engine call inside the block whose ``backend`` is ``"auto"`` on backend ``name``.

    ``name`` is ``"auto"`` (restores automatic dispatch inside an outer block) or one of ``list_backends()``.
    A per-call ``backend=`` other than ``"auto"`` still wins. A call the forced backend cannot run raises the
    ValueError an explicit ``backend=`` gives (no silent fallback); the dense op ``attention`` runs on
    ``"reference"`` always and on the other backends when the call is one full neighborhood (as many queries
    as keys, no dropout, an ``attn_mask`` that is the same for every query). A mechanism's own fast path (Swin's
    roll + masked SDPA in ``window``) is taken only while ``resolve_backend(self.backend)`` is ``"auto"``. Blocks
    nest; the previous setting returns on exit, also on an exception.
    """
    token = _FORCED.set(_check_name(name))
    try:
        yield name
    finally:
        _FORCED.reset(token)


def resolve_backend(backend: str = "auto") -> str:
    """The backend a call with ``backend=`` would be forced to: ``backend`` itself unless it is ``"auto"``, then the
    innermost ``use_backend`` (``"auto"`` when none). Mechanisms with a fast path of their own take it only when
    this is ``"auto"``."""
    if isinstance(backend, str) and backend == "auto":
        return _FORCED.get()
    return _check_name(backend, "backend")


def select(backend: str, problem: NAProblem) -> Backend:
    """``select_backend`` after the switch: ``"auto"`` takes the forced name, if any, and its refusal says so."""
    name = _FORCED.get() if backend == "auto" else "auto"
    if name == "auto":
        return select_backend(backend, problem)
    try:
        return select_backend(name, problem)
    except ValueError as exc:
        raise ValueError(f"{exc} ({forced_by(name)})") from None


def forced_by(name: str) -> str:
    return f"forced by attnzoo.ops.use_backend({name!r})"


@contextmanager
def record_backends() -> Iterator[list[BackendRun]]:
    """Collect a ``BackendRun(op, backend)`` per engine call made inside the block (nested blocks share one list).

    Costs one context-variable read per call when no block is active."""
    outer = _RUNS.get()
    runs = outer if outer is not None else []
    token = _RUNS.set(runs)
    try:
        yield runs
    finally:
        _RUNS.reset(token)


def note(op: str, backend: str) -> None:
    """Record that ``op`` ran on ``backend`` (a no-op outside ``record_backends``)."""
    runs = _RUNS.get()
    if runs is not None:
        runs.append(BackendRun(op, backend))
