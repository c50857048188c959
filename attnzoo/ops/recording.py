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


_RECORDS: list[AttentionRecord] | None = None


def is_recording() -> bool:
    return _RECORDS is not None


@contextmanager
def record_attention(max_tokens: int = 16384) -> Iterator[list[AttentionRecord]]:
    """Collect an ``AttentionRecord`` per attention call made inside the block (nested blocks share one list)."""
    global _RECORDS
    outer = _RECORDS
    records: list[AttentionRecord] = outer if outer is not None else []
    _RECORDS = records
    _LIMIT[0] = max_tokens
    try:
        yield records
    finally:
        _RECORDS = outer


_LIMIT = [16384]


def add(op: str, weights: torch.Tensor, query_shape, key_shape, extra_keys: int = 0) -> None:
    if _RECORDS is None:
        return
    n_q, n_k = weights.shape[-2], weights.shape[-1]
    if n_q * n_k > _LIMIT[0] * _LIMIT[0]:
        raise ValueError(f"record_attention: {n_q}×{n_k} attention is too large to record (max_tokens={_LIMIT[0]})")
    _RECORDS.append(AttentionRecord(op, weights.detach().float(), tuple(query_shape), tuple(key_shape), extra_keys))
