"""GMM attention ("RetNet viewed through convolution"): self-attention with a learned Gaussian-mixture distance mask."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn

from ..ops import attention
from ._base import Mechanism, cached_table, check_int, check_probability, merge_heads, resolve_heads, split_qkv
from .registry import register_mechanism

__all__ = ["GaussianMixtureMaskAttention", "squared_distances"]


@lru_cache(maxsize=32)
def squared_distances(height: int, width: int) -> torch.Tensor:
    """``[N, N]`` squared Euclidean distance between the row-major tokens of an ``H×W`` grid."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return ((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2).double()


@register_mechanism(
    "gaussian_mixture_mask",
    family="global",
    paper="RetNet Viewed through Convolution",
    year=2023,
    native_rank=2,
    complexity="quadratic",
    reference="CatworldLee/LKCA-MiniViTsTrainer-Pytorch-CIFAR-TinyImageNet readme.md (GMM-ViT, --is_GMM)",
    note=(
        "The repository's README describes the mask but its model code is not in the search index. Implemented: "
        "per head a mixture of num_gaussians 2-parameter Gaussians M_h(Δ) = Σ_k α_hk·exp(−|Δ|²/(2σ_hk²)) of the "
        "2-D offset Δ between query and key patch (the README's (2N−1)² relative table, unfolded per patch), added "
        "to the attention logits before the softmax — i.e. the attention weights are multiplied by exp(M) and "
        "renormalised. α_hk initialised to 1, σ_hk to 1, 2, 4, … patches (learned as log σ)."
    ),
    test_kwargs={"num_heads": 2, "num_gaussians": 3},
    test_size=(5, 6),
)
class GaussianMixtureMaskAttention(Mechanism):
    """Gaussian-mixture-mask attention (Li & Zhang, "RetNet Viewed through Convolution", 2023).

    MHSA whose logits get a learned, translation-invariant bias: a per-head mixture of isotropic Gaussians of the
    2-D patch distance (a soft, learnable locality prior, like a large convolution kernel).

    Args:
        dim: channels in/out.
        num_heads: heads (None: ``dim // 32``).
        num_gaussians: mixture components per head (each with a weight α and a width σ).
        qkv_bias: bias of the qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        num_gaussians: int = 4,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        check_int("num_gaussians", num_gaussians)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.alpha = nn.Parameter(torch.ones(self.num_heads, num_gaussians))
        self.log_sigma = nn.Parameter(
            torch.log(2.0 ** torch.arange(num_gaussians, dtype=torch.float32)).repeat(self.num_heads, 1)
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def mask(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask ``[heads, N, N]``: ``Σ_k α_hk·exp(−d²/(2σ_hk²))``."""
        d2 = cached_table(squared_distances, height, width).to(device=self.alpha.device, dtype=dtype)
        sigma2 = torch.exp(2 * self.log_sigma.to(dtype))
        gaussians = torch.exp(-d2 / (2 * sigma2[..., None, None]))  # [h, K, N, N]
        return torch.einsum("hk,hkij->hij", self.alpha.to(dtype), gaussians)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.check_input(x)
        q, k, v = split_qkv(self.qkv(x.flatten(1, 2)), self.num_heads)
        bias = self.mask(height, width, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        out = attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_gaussians={self.alpha.shape[1]}"
