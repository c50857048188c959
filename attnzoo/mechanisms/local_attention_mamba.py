"""LaMamba-Diff's mixer: local (neighborhood) attention in parallel with a bidirectional Mamba over all tokens."""

from __future__ import annotations

from typing import Sequence

import torch

from ._base import Mechanism
from .bidirectional_ssm import BidirectionalSSM
from .neighborhood import NeighborhoodAttention
from .registry import register_mechanism

__all__ = ["LocalAttentionMamba"]


@register_mechanism(
    "local_attention_mamba",
    family="state-space",
    paper="LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba",
    year=2024,
    native_rank=2,
    complexity="linear",
    reference="paper equations and text (no official code read; see note)",
    note=(
        "From the paper's description (no official code read): the local branch is attnzoo's neighborhood "
        "attention (NAT, kernel_size 7 with relative position bias, on the engine), the global branch is the "
        "bidirectional_ssm mixer (Vim's bimamba v2) over the row-major tokens; the two branch outputs are summed."
    ),
    test_kwargs={"kernel_size": 3, "num_heads": 2, "chunk_size": 8},
    test_size=(6, 7),
    size_args={"kernel_size": "kernel"},
)
class LocalAttentionMamba(Mechanism):
    """Local attention ∥ Mamba (Fu et al., "LaMamba-Diff", 2024): fine local detail plus a linear-time global path.

    ``out = NA_k(x) + BiMamba(x)``: neighborhood attention over a ``kernel_size`` window (``attnzoo.ops``
    engine) and a forward + backward selective scan over all tokens (``bidirectional_ssm``).

    Args:
        dim: channels in/out.
        num_heads: heads of the local attention branch (None: ``dim // 32``).
        kernel_size: neighborhood of the local attention branch.
        d_state: SSM state size of the Mamba branch.
        ssm_ratio: inner width factor of the Mamba branch.
        chunk_size: chunk length of the chunkwise scan.
        proj_drop: dropout on each branch's output.
        backend: engine backend of the attention branch.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        kernel_size: int | Sequence[int] = 7,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        chunk_size: int = 64,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        self.attention = NeighborhoodAttention(
            dim, num_heads=num_heads, kernel_size=kernel_size, proj_drop=proj_drop, backend=backend
        )
        self.mamba = BidirectionalSSM(
            dim, d_state=d_state, ssm_ratio=ssm_ratio, chunk_size=chunk_size, proj_drop=proj_drop
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.attention(x) + self.mamba(x)
