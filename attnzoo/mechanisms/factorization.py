"""FaViT factorization self-attention: head groups attend to neighborhoods at dilation rates 1, 2, …"""

from __future__ import annotations

from typing import Sequence

from ._head_groups import GroupedNeighborhood
from .registry import register_mechanism


@register_mechanism(
    "factorization",
    family="local",
    paper="Factorization Vision Transformer: Modeling Long Range Dependency with Local Window Cost",
    year=2023,
    complexity="N·k",
    reference="official q2479036243/FaViT (FaViT/classification/favit.py, Attention)",
    receptive_field="local",
    note="implements the factorization as the paper states it: the heads split into groups, group g attends "
    "to its kernel_size neighborhood at dilation g+1, in one engine call (head_groups=). The official code differs: "
    "one channel group attends to a spatially reduced global map (sr_ratio), the others to keys built by unfolding "
    "non-overlapping dilated 7×7 windows and average-pooling them over all windows (one shared set of 49 keys per "
    "group), plus depthwise-conv value enhancement; that variant is not implemented",
    test_kwargs={"kernel_size": 3, "dilation": (1, 2), "num_heads": 2},
    test_size=(8, 8),
    size_args={"dilation": "dilation", "kernel_size": "span"},
)
class FactorizationAttention(GroupedNeighborhood):
    """Factorization self-attention (Qin et al., FaViT, arXiv 2023), head-group form.

    Heads split into ``len(dilation)`` equal groups; group g attends to the ``kernel_size`` neighborhood at
    dilation ``dilation[g]``, so the groups together see a ``kernel_size·max(dilation)`` span at window cost.
    The groups run as one ``neighborhood_attention`` call with ``head_groups``.

    Args:
        dim: channels. kernel_size: window of every group (7 as in FaViT). dilation: one rate per group ((1, 2)).
        num_heads, head_dim: heads (default one per group per 32 channels) and per-head width. qkv_bias: bias of
        ``qkv``. attn_drop: must be 0. proj_drop: output dropout. rank: spatial axes. backend: engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int | Sequence[int] = 7,
        dilation: Sequence[int | Sequence[int]] = (1, 2),
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int = 2,
        backend: str = "auto",
    ) -> None:
        if not isinstance(dilation, (tuple, list)):
            raise TypeError(f"dilation={dilation!r} must be a sequence with one rate per head group")
        super().__init__(
            dim,
            kernel_size=[kernel_size] * len(dilation),
            dilation=dilation,
            num_heads=num_heads,
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rank=rank,
            backend=backend,
        )
