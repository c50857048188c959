"""Mixture of Sparse Attention (MoA), vision port: each head group has its own neighborhood span."""

from __future__ import annotations

from typing import Sequence

from ._head_groups import GroupedNeighborhood
from .registry import register_mechanism


@register_mechanism(
    "mixture_of_sparse",
    family="local",
    paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
    year=2024,
    complexity="N·k",
    reference="official thu-nics/MoA (MoA/attention/sparse_mask.py, MoA/kernels/mixture_of_attention.py)",
    receptive_field="local",
    note="MoA gives every head of a causal LLM its own sliding-window span (chosen offline by profiling, elastic "
    "rule span = α + β·length) plus a few global initial tokens. Vision port implemented here: heads split into "
    "groups with their own 2-D neighborhood kernel_size (and dilation), non-causal, no global tokens, one engine "
    "call with head_groups=; the spans are constructor arguments, not profiled",
    test_kwargs={"kernel_size": (3, 5), "num_heads": 2},
    test_size=(8, 8),
    size_args={"kernel_size": "span"},
)
class MixtureOfSparseAttention(GroupedNeighborhood):
    """Mixture of sparse attention (Fu et al., MoA, 2024) as heterogeneous per-head neighborhood spans.

    Heads split into ``len(kernel_size)`` equal groups; group g attends to its ``kernel_size[g]`` neighborhood
    (at ``dilation[g]``), as MoA's heads attend to their own sliding-window span.

    Args:
        dim: channels. kernel_size: one span per head group ((3, 5, 7, 9)). dilation: one rate per group (default
        1 for all). num_heads, head_dim: heads (default one per group per 32 channels) and per-head width.
        qkv_bias: bias of ``qkv``. attn_drop: must be 0. proj_drop: output dropout. rank: spatial axes. backend:
        engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: Sequence[int | Sequence[int]] = (3, 5, 7, 9),
        dilation: Sequence[int | Sequence[int]] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        if not isinstance(kernel_size, (tuple, list)):
            raise TypeError(f"kernel_size={kernel_size!r} must be a sequence with one span per head group")
        super().__init__(
            dim,
            kernel_size=kernel_size,
            dilation=dilation if dilation is not None else [1] * len(kernel_size),
            num_heads=num_heads,
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rank=rank,
            backend=backend,
        )
