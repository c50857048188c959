"""Hiera mask-unit attention: attention inside each mask unit, with optional query max-pooling."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import attention, neighborhood_attention, normalize_axis_arg
from ._base import Mechanism, merge_heads, reject_attn_drop, resolve_heads, split_qkv
from ._windows import pad_to_multiple
from .registry import register_mechanism


@register_mechanism(
    "mask_unit",
    family="local",
    paper="Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles",
    year=2023,
    complexity="N·k",
    reference="timm.models.hiera.MaskUnitAttention (use_mask_unit_attn=True)",
    receptive_field="local",
    test_kwargs={"window_size": 4, "num_heads": 2},
    test_size=(8, 8),
    size_args={"window_size": "extent"},
)
class MaskUnitAttention(Mechanism):
    """Mask-unit attention (Ryali et al., Hiera, ICML 2023; also TurboViT's building block).

    Tokens attend inside non-overlapping ``window_size`` mask units, with no position bias. ``q_stride`` > 1
    max-pools the queries inside each unit (Hiera's stage transitions): the output then has the spatial shape
    divided by ``q_stride`` (each pooled query still attends to every key of its unit). Without pooling the input
    is zero-padded at the end to whole units and the padded keys are masked; with pooling the extents must be
    multiples of ``window_size``. The parameters are timm's (``qkv``, ``proj``).

    Args:
        dim: channels. num_heads, head_dim: heads (default ``dim // 32``) and per-head width. qkv_bias: bias of
        ``qkv``. window_size: mask-unit extent (Hiera's stage-1 unit is 8×8 tokens). q_stride: query pooling per
        axis (divides ``window_size``). attn_drop: must be 0. proj_drop: output dropout. backend: engine backend.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        window_size: int | Sequence[int] = 8,
        q_stride: int | Sequence[int] = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.window_size = normalize_axis_arg("window_size", window_size, 2, minimum=2)
        self.q_stride = normalize_axis_arg("q_stride", q_stride, 2, minimum=1)
        for axis, (m, s) in enumerate(zip(self.window_size, self.q_stride)):
            if m % s:
                raise ValueError(f"q_stride={q_stride!r} must divide window_size={m} along axis {axis}, got {s}")
        self.backend = backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        b, h, w, c = input_shape
        return (b, h // self.q_stride[0], w // self.q_stride[1], c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        if self.q_stride == (1, 1):
            padding = pad_to_multiple(spatial, self.window_size)
            q, k, v = split_qkv(self.qkv(padding.pad(x)), self.num_heads)
            out = neighborhood_attention(
                q,
                k,
                v,
                self.window_size,
                self.window_size,
                key_bias=padding.key_bias(q.dtype, q.device),
                backend=self.backend,
            )
            return self.proj_drop(self.proj(merge_heads(padding.crop(out))))
        if any(e % m for e, m in zip(spatial, self.window_size)):
            raise ValueError(
                f"x.shape={tuple(x.shape)}: with q_stride={self.q_stride} the spatial extents must be multiples of "
                f"window_size={self.window_size}"
            )
        (mh, mw), (sh, sw) = self.window_size, self.q_stride
        units = rearrange(x, "b (nh mh) (nw mw) c -> (b nh nw) mh mw c", mh=mh, mw=mw)
        q, k, v = split_qkv(self.qkv(units), self.num_heads)
        q = rearrange(q, "u (ph sh) (pw sw) h d -> u ph pw h d (sh sw)", sh=sh, sw=sw).amax(-1)
        out = attention(q, k, v)
        out = rearrange(
            merge_heads(out), "(b nh nw) ph pw c -> b (nh ph) (nw pw) c", nh=spatial[0] // mh, nw=spatial[1] // mw
        )
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, q_stride={self.q_stride}"
