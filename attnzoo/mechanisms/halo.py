"""HaloNet blocked local self-attention with a halo and factorised relative logits."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import Mechanism, check_divisible, check_int, renamed_kwargs, resolve_heads
from ._windows import Padding, pad_to_multiple
from .registry import register_mechanism


@register_mechanism(
    "halo",
    family="local",
    receptive_field="local",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    year=2021,
    native_rank=2,
    complexity="N·k",
    reference="timm.layers.halo_attn.HaloAttn",
    test_kwargs={"window_size": 4, "halo_size": 1, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class HaloAttention(Mechanism):
    """HaloNet blocked local attention (Vaswani et al., HaloNet 2021): each b×b query block attends to its
    (b + 2·halo)² neighbourhood.

    q, [k, v] are 1×1 projections (``kv`` channels per head are ``[k_h, v_h]``, as timm); k, v are zero-padded
    by ``halo_size`` after projection (and at the end to a multiple of ``window_size``). Logits are
    ``scale·q·k + q·r_h[Δy] + q·r_w[Δx]`` with relative embeddings shared by the heads and indexed by
    ``j − i + w − 1`` (j: key position in the window, i: query position in the block, w = b + 2·halo).
    ``mask_padding=True`` drops padded keys; ``False`` keeps them (k = v = 0) like timm. No output projection:
    the output is the concatenated heads (``C`` channels). ``stride=2`` subsamples the queries inside each block
    (or average-pools the output when ``window_size`` is not divisible by it), returning ``ceil(H/2)×ceil(W/2)``.

    The relative logits depend on q, so the op is a blocked dense attention with an additive per-block bias
    (``attnzoo.ops.attention``) rather than the static-table neighborhood op.
    """

    @renamed_kwargs(block_size="window_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        window_size: int = 8,
        halo_size: int = 3,
        stride: int = 1,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        check_divisible("dim", dim, "num_heads", self.num_heads)  # values keep dim channels
        self.head_dim_v = dim // self.num_heads
        self.window_size = check_int("window_size", window_size)
        self.halo_size = check_int("halo_size", halo_size, 0)
        self.stride = check_int("stride", stride)
        if stride > window_size:
            raise ValueError(f"stride={stride} must be <= window_size={window_size}")
        self.mask_padding = bool(mask_padding)
        # strided query blocks when the block splits evenly, else full-resolution attention then average pooling
        self.query_stride = stride if window_size % stride == 0 else 1
        self.window = window_size + 2 * halo_size
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, self.num_heads * self.head_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, self.num_heads * (self.head_dim + self.head_dim_v), bias=qkv_bias)
        self.height_rel = nn.Parameter(torch.zeros(2 * self.window - 1, self.head_dim))
        self.width_rel = nn.Parameter(torch.zeros(2 * self.window - 1, self.head_dim))
        for table in (self.height_rel, self.width_rel):
            nn.init.trunc_normal_(table, std=self.scale)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        b, h, w, c = input_shape
        return (b, -(-h // self.stride), -(-w // self.stride), c)

    def _relative_logits(self, q: torch.Tensor) -> torch.Tensor:
        """``q·r_h[Δy] + q·r_w[Δx]`` for q ``[n, i, i, heads, d]`` → ``[n, heads, i·i, w·w]``."""
        w = self.window
        i = q.shape[1]
        index = torch.arange(w, device=q.device)[None, :] - torch.arange(i, device=q.device)[:, None] + w - 1
        along_h = torch.einsum("nyxhd,ykd->nhyxk", q, self.height_rel[index].to(q.dtype))
        along_w = torch.einsum("nyxhd,xkd->nhyxk", q, self.width_rel[index].to(q.dtype))
        logits = along_h[..., :, None] + along_w[..., None, :]
        return rearrange(logits, "n h y x ky kx -> n h (y x) (ky kx)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        b, halo, w = self.window_size, self.halo_size, self.window
        blocks = pad_to_multiple(spatial, (b, b))
        halo_pad = Padding(spatial, (halo, halo), tuple(a + halo for a in blocks.after))
        qs = self.query_stride
        q = self.q(blocks.pad(x)[:, ::qs, ::qs])
        kv = halo_pad.pad(self.kv(x))  # zero k and v in the halo and block padding
        grid = {"nh": blocks.padded_shape[0] // b, "nw": blocks.padded_shape[1] // b}
        q = rearrange(q, "b (nh i) (nw j) (h d) -> (b nh nw) i j h d", **grid, h=self.num_heads)
        kv = rearrange(
            kv.unfold(1, w, b).unfold(2, w, b), "b nh nw (h c) ky kx -> (b nh nw) (ky kx) h c", h=self.num_heads
        )
        k, v = kv.split([self.head_dim, self.head_dim_v], dim=-1)
        bias = self._relative_logits(q)
        if self.mask_padding and not halo_pad.is_empty:
            valid = halo_pad.valid_mask(x.device).unfold(0, w, b).unfold(1, w, b)
            dropped = torch.zeros(valid.shape, dtype=bias.dtype, device=x.device).masked_fill(~valid, float("-inf"))
            dropped = rearrange(dropped, "nh nw ky kx -> (nh nw) 1 1 (ky kx)").repeat(x.shape[0], 1, 1, 1)
            bias = bias + dropped
        out = attention(q, k, v, scale=self.scale, attn_mask=bias)
        out = rearrange(out, "(b nh nw) i j h d -> b (nh i) (nw j) (h d)", **grid)
        out = out[:, : -(-spatial[0] // qs), : -(-spatial[1] // qs)]
        if self.stride > qs:
            pooled = F.avg_pool2d(out.permute(0, 3, 1, 2), self.stride, ceil_mode=True)
            out = pooled.permute(0, 2, 3, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, "
            f"halo_size={self.halo_size}, stride={self.stride}, mask_padding={self.mask_padding}"
        )
