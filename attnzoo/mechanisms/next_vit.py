"""Next-ViT token mixers: multi-head convolutional attention (NCB) and the NTB's E-MHSA + MHCA mix."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_choice, check_divisible, check_int, check_probability, flatten_tokens, merge_heads
from ._channel_conv import to_nchw, to_nhwc
from .registry import register_mechanism


def rounded_width(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``, never below 90 % of it)."""
    width = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return width + divisor if width < 0.9 * value else width


class ConvAttention(nn.Module):
    """MHCA on NCHW maps: Conv1×1(ReLU(BN(GroupConv3×3(x)))), one group per head of ``head_dim`` channels."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim // head_dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.ReLU()
        self.projection = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class PointwiseBN(nn.Sequential):
    """Conv1×1 (no bias) → BatchNorm on NCHW maps: Next-ViT's channel-changing ``PatchEmbed`` at stride 1."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(nn.Conv2d(dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))


class EfficientAttention(nn.Module):
    """E-MHSA on ``(B, N, C)`` tokens: keys/values from the token sequence average-pooled by ``sr_ratio²`` + BN."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.head_dim, self.sr_ratio = dim // head_dim, head_dim, sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm = nn.BatchNorm1d(dim) if sr_ratio > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = dict(h=self.num_heads)
        q = rearrange(self.q(x), "b n (h d) -> b n h d", **heads)
        if self.norm is not None:
            pooled = F.avg_pool1d(x.transpose(1, 2), self.sr_ratio**2)  # runs of sr² consecutive raster tokens
            x = self.norm(pooled).transpose(1, 2)
        k = rearrange(self.k(x), "b n (h d) -> b n h d", **heads)
        v = rearrange(self.v(x), "b n (h d) -> b n h d", **heads)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


@register_mechanism(
    "next_vit",
    family="conv",
    paper="Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic Industrial Scenarios",
    year=2022,
    complexity="linear",
    receptive_field="local",
    reference="timm.models.nextvit.NextConvBlock (mhca) and NextTransformerBlock (everything before norm2/mlp); "
    "official bytedance/Next-ViT classification/nextvit.py (read)",
    note="kind='ncb' returns MHCA(x) (the NCB adds x). kind='ntb' returns the NTB's mixed map cat(z, o + MHCA(o)) "
    "with z = y + E-MHSA(BN(y)), y = PatchEmbed(x), o = Conv1×1-BN(z), which in Next-ViT replaces x; attnzoo's "
    "block adds x to it. The MHSA width is rounded to a multiple of head_dim (Next-ViT rounds to 32, its head_dim). "
    "E-MHSA pools runs of sr_ratio² consecutive raster-order tokens (AvgPool1d), as the official code does.",
    test_kwargs={"kind": "ntb", "head_dim": 8},
    size_args={"sr_ratio": "ratio"},
)
class NextViTMixer(Mechanism):
    """Next-ViT token mixers (Li et al., 2022).

    ``kind="ncb"`` (Next Convolution Block): multi-head convolutional attention, Conv1×1(ReLU(BN(GConv3×3(x)))) with
    one 3×3 group per head. ``kind="ntb"`` (Next Transformer Block): the first ``round(mix_block_ratio · dim)``
    channels (y, after a Conv1×1+BN when the width changes) get efficient MHSA, z = y + E-MHSA(BN(y)) with keys
    and values average-pooled ``sr_ratio²``-fold; z is projected (Conv1×1+BN) to the remaining channels o, which get
    o + MHCA(o); the output is the concatenation [z, o].

    Args:
        dim: channels, a multiple of ``head_dim``.
        kind: ``"ncb"`` or ``"ntb"``.
        head_dim: channels per head of both MHCA groups and E-MHSA heads (32).
        sr_ratio: E-MHSA key/value pooling factor per axis (Next-ViT: 8, 4, 2, 1 over its four stages).
        mix_block_ratio: share of channels for E-MHSA in the NTB (0.75).
        qkv_bias: biases of the E-MHSA q/k/v projections (True).
        attn_drop: dropout on the E-MHSA attention weights.
        proj_drop: dropout after the E-MHSA output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "ncb",
        head_dim: int = 32,
        sr_ratio: int = 2,
        mix_block_ratio: float = 0.75,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        self.kind = check_choice("kind", kind, ("ncb", "ntb"))
        self.head_dim = check_int("head_dim", head_dim)
        check_divisible("dim", dim, "head_dim", head_dim)
        self.sr_ratio = check_int("sr_ratio", sr_ratio)
        if kind == "ncb":
            self.mhca = ConvAttention(dim, head_dim)
            return
        if isinstance(mix_block_ratio, bool) or not 0 < mix_block_ratio < 1:
            raise ValueError(f"mix_block_ratio={mix_block_ratio!r} must be in (0, 1)")
        self.mhsa_dim = rounded_width(int(dim * mix_block_ratio), head_dim)
        self.mhca_dim = dim - self.mhsa_dim
        if self.mhca_dim < head_dim:
            raise ValueError(
                f"kind='ntb' with dim={dim}, head_dim={head_dim}, mix_block_ratio={mix_block_ratio} leaves "
                f"{self.mhca_dim} MHCA channels; it needs at least head_dim (use a larger dim or smaller head_dim)"
            )
        self.patch_embed = PointwiseBN(dim, self.mhsa_dim) if self.mhsa_dim != dim else nn.Identity()
        self.norm1 = nn.BatchNorm2d(self.mhsa_dim)
        self.e_mhsa = EfficientAttention(
            self.mhsa_dim,
            head_dim,
            sr_ratio,
            qkv_bias,
            check_probability("attn_drop", attn_drop),
            check_probability("proj_drop", proj_drop),
        )
        self.projection = PointwiseBN(self.mhsa_dim, self.mhca_dim)
        self.mhca = ConvAttention(self.mhca_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        if self.kind == "ncb":
            return to_nhwc(self.mhca(to_nchw(x)))
        tokens = spatial[0] * spatial[1]
        if self.sr_ratio > 1 and tokens < self.sr_ratio**2:
            raise ValueError(
                f"sr_ratio={self.sr_ratio} pools runs of {self.sr_ratio**2} tokens; x.shape={tuple(x.shape)} has "
                f"{tokens} tokens"
            )
        y = self.patch_embed(to_nchw(x))
        z = to_nhwc(y) + self.e_mhsa(flatten_tokens(to_nhwc(self.norm1(y)))).reshape(*x.shape[:-1], self.mhsa_dim)
        o = self.projection(to_nchw(z))
        return torch.cat([z, to_nhwc(o + self.mhca(o))], dim=-1)

    def extra_repr(self) -> str:
        widths = "" if self.kind == "ncb" else f", mhsa_dim={self.mhsa_dim}, mhca_dim={self.mhca_dim}"
        return f"dim={self.dim}, kind={self.kind!r}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}{widths}"
