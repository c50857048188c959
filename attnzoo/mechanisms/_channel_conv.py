"""Small shared pieces of the channel / convolutional mechanisms: bottleneck width, layout permutes, attention
pooling."""

from __future__ import annotations

import torch

from ._base import check_int, flatten_tokens

__all__ = ["reduced_width", "to_nchw", "to_nhwc", "softmax_pool", "token_mean"]


def reduced_width(dim: int, reduction: int) -> int:
    """Bottleneck width ``dim // reduction`` (at least 1), the rounding of the SE / CBAM / GCNet papers."""
    check_int("reduction", reduction)
    return max(1, dim // reduction)


def token_mean(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, 1, C)`` average over the tokens (the channel gates' squeeze). Without autograd it is a
    matrix product with a row of ``1/N``, ~1.6× faster than ``mean(1)`` on an Intel Xeon (not on an AMD EPYC, where
    PyTorch's matmul takes its AVX2 path: 0.82-1.22 ms against 0.78-0.82 ms for mean/sum at B8, 56²×256, 1 thread,
    two runs); with autograd a sum times ``1/N``, whose backward hands the input a broadcast view (``mean``'s
    backward materialises a full-size ``grad / N`` tensor first: ~20 % of a squeeze-excite fwd+bwd at 56²×256)."""
    if torch.is_grad_enabled() and tokens.requires_grad:
        return tokens.sum(1, keepdim=True) * (1.0 / tokens.shape[1])
    return torch.matmul(tokens.new_full((1, tokens.shape[1]), 1.0 / tokens.shape[1]), tokens)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last ``(B, H, W, C)`` → ``(B, C, H, W)``."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → channels-last ``(B, H, W, C)``."""
    return x.permute(0, 2, 3, 1)


def softmax_pool(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention pooling Σ_j SM_j(logits)_j · values_j over all positions (GCNet context, PSA channel branch).

    ``logits`` ``(B, *spatial, 1)``, ``values`` ``(B, *spatial, C)`` → ``(B, C)``.
    """
    weights = flatten_tokens(logits).softmax(dim=1)  # (B, N, 1)
    return (weights.transpose(1, 2) @ flatten_tokens(values)).squeeze(1)
