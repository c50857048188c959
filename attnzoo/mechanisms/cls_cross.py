"""CrossViT CLS-token cross-attention: the CLS token attends to every token of its sequence."""

from __future__ import annotations

from typing import Sequence

import torch

from ._base import flatten_tokens
from .cross import CrossAttention
from .registry import register_mechanism

__all__ = ["ClsCrossAttention"]


@register_mechanism(
    "cls_cross",
    family="cross",
    paper="CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
    year=2021,
    layout="sequence",
    native_rank=1,
    complexity="linear",
    reference="timm.models.crossvit.CrossAttention",
    test_kwargs={"num_heads": 4},
    test_size=(12,),
)
class ClsCrossAttention(CrossAttention):
    """CLS-token cross-attention (Chen et al., CrossViT, 2021): one query, from token 0, over all N tokens.

    Input ``x = [cls; patches]`` ``(B, N, C)`` (or ``(B, *spatial, C)``, flattened row-major, token 0 = CLS);
    ``q = q(x₀)``, ``[k, v] = kv(x)`` over all N tokens including the CLS token; output ``proj(softmax(s·qkᵀ)v)`` of
    shape ``(B, 1, C)``. Cost linear in N. The CrossViT block adds x₀ and projects back to its branch width.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(
            dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.check_input(x)
        tokens = flatten_tokens(x)
        return super().forward(tokens[:, :1], context=tokens)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return (input_shape[0], 1, input_shape[-1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
