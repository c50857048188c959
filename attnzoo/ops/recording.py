"""Capture the exact attention weights of every engine call inside a ``with record_attention()`` block.

Used by the pictures (``attnzoo viz``): any mechanism built on ``neighborhood_attention`` or ``attention`` shows
its true attention pattern without mechanism-specific code. Weights are recomputed densely (detached, float32), so
recording is meant for small inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["AttentionRecord", "record_attention", "is_recording"]


@dataclass
class AttentionRecord:
    """One attention call: ``weights[b, h, i, j]`` is how much query ``i`` attends to key ``j``.

    ``query_shape``/``key_shape`` are the spatial shapes of queries and keys (keys of a neighborhood call include
    its additional keys after the spatial ones: ``extra_keys`` says how many).
    """

    op: str
    weights: torch.Tensor
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    extra_keys: int = 0


@dataclass
class _Session:
    records: list[AttentionRecord]
    max_tokens: int


# Context-local (contextvars): each thread starts with no recording, and an asyncio task sees the recording of the
# context it was created in, so concurrent callers never land in each other's list.
_ACTIVE: ContextVar[_Session | None] = ContextVar("attnzoo_record_attention", default=None)


def is_recording() -> bool:
    return _ACTIVE.get() is not None


@contextmanager
def record_attention(max_tokens: int = 16384) -> Iterator[list[AttentionRecord]]:
    """Collect an ``AttentionRecord`` per attention call made inside the block (nested blocks share one list).

    A call with more than ``max_tokens`` queries or keys raises instead of building its dense weights.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be a positive int")
    outer = _ACTIVE.get()
    session = _Session(outer.records if outer is not None else [], max_tokens)
    token = _ACTIVE.set(session)
    try:
        yield session.records
    finally:
        _ACTIVE.reset(token)


def check_size(n_queries: int, n_keys: int) -> None:
    """Raise before any work when a call is too large to record densely."""
    session = _ACTIVE.get()
    if session is not None and max(n_queries, n_keys) > session.max_tokens:
        raise ValueError(
            f"record_attention: {n_queries}×{n_keys} attention is too large to record (max_tokens={session.max_tokens})"
        )


def add(op: str, weights: torch.Tensor, query_shape, key_shape, extra_keys: int = 0) -> None:
    session = _ACTIVE.get()
    if session is not None:
        session.records.append(
            AttentionRecord(op, weights.detach().float(), tuple(query_shape), tuple(key_shape), extra_keys)
        )
