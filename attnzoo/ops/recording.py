"""Capture the exact attention weights of every engine call inside a ``with record_attention()`` block.

Used by the pictures (``attnzoo viz``): any mechanism built on ``neighborhood_attention`` or ``attention`` shows
its true attention pattern without mechanism-specific code. Weights are recomputed densely (detached, float32), so
recording is meant for small inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
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


_ACTIVE: _Session | None = None


def is_recording() -> bool:
    return _ACTIVE is not None


@contextmanager
def record_attention(max_tokens: int = 16384) -> Iterator[list[AttentionRecord]]:
    """Collect an ``AttentionRecord`` per attention call made inside the block (nested blocks share one list).

    A call with more than ``max_tokens`` queries or keys raises instead of building its dense weights.
    """
    global _ACTIVE
    outer = _ACTIVE
    _ACTIVE = _Session(outer.records if outer is not None else [], max_tokens)
    try:
        yield _ACTIVE.records
    finally:
        _ACTIVE = outer


def check_size(n_queries: int, n_keys: int) -> None:
    """Raise before any work when a call is too large to record densely."""
    if _ACTIVE is not None and max(n_queries, n_keys) > _ACTIVE.max_tokens:
        raise ValueError(
            f"record_attention: {n_queries}×{n_keys} attention is too large to record (max_tokens={_ACTIVE.max_tokens})"
        )


def add(op: str, weights: torch.Tensor, query_shape, key_shape, extra_keys: int = 0) -> None:
    if _ACTIVE is not None:
        _ACTIVE.records.append(
            AttentionRecord(op, weights.detach().float(), tuple(query_shape), tuple(key_shape), extra_keys)
        )
