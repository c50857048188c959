"""GCNet global context block: one attention-pooled context vector, transformed and fused into every position."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import Mechanism, check_choice
from ._channel_conv import reduced_width, softmax_pool
from .registry import register_mechanism


@register_mechanism(
    "global_context",
    family="channel",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    year=2019,
    complexity="linear",
    paper_identity=True,
    reference="timm.layers.global_context.GlobalContext(C, fuse_add=True, fuse_scale=False, rd_ratio=1/16); "
    "mmcv.cnn.ContextBlock(C, ratio=1/16)",
)
class GlobalContext(Mechanism):
    """Global context block (Cao et al., 2019): c = Σ_j SM_j(W_k x_j) x_j, t = W₂ ReLU(LN(W₁ c)).

    ``pooling='att'`` pools with a learned softmax over positions (W_k: C→1 with bias), ``'avg'`` is global average
    pooling. The transform is a bottleneck ``C → C // reduction → C`` with LayerNorm (eps 1e-5 as in the official
    code; timm's LayerNorm2d uses 1e-6). ``fusion='add'`` (paper default; GCNet outputs x + t) returns t broadcast
    over H×W, the identity belongs to the block (``paper_identity``); ``fusion='mul'`` returns x ⊙ σ(t).
    As in the official code W₂ starts at zero, so 'add' outputs zeros and 'mul' outputs x/2 at initialisation.
    """

    def __init__(self, dim: int, *, reduction: int = 16, fusion: str = "add", pooling: str = "att") -> None:
        super().__init__(dim)
        self.fusion = check_choice("fusion", fusion, ("add", "mul"))
        self.pooling = check_choice("pooling", pooling, ("att", "avg"))
        hidden = reduced_width(dim, reduction)
        self.reduction = reduction
        if pooling == "att":
            self.conv_attn = nn.Linear(dim, 1)
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled context vector c, shape ``(B, C)``."""
        if self.pooling == "avg":
            return x.mean(dim=(1, 2))
        return softmax_pool(self.conv_attn(x), x)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """t = W₂ ReLU(LN(W₁ c)), shape ``(B, 1, 1, C)``."""
        return self.fc2(self.act(self.norm(self.fc1(self.context(x)))))[:, None, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        t = self.transform(x)
        if self.fusion == "mul":
            return x * torch.sigmoid(t)
        return t.expand_as(x).contiguous()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, fusion={self.fusion!r}, pooling={self.pooling!r}"
