"""Single-scale deformable attention (Deformable DETR's encoder attention at one feature level)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ._base import Mechanism, check_int, reject_attn_drop, resolve_heads
from .registry import register_mechanism


@register_mechanism(
    "deformable",
    family="local",
    paper="Deformable DETR: Deformable Transformers for End-to-End Object Detection",
    year=2021,
    complexity="linear",
    reference="transformers.models.deformable_detr.DeformableDetrMultiscaleDeformableAttention (pure-torch path), "
    "one feature level",
    receptive_field="local",
    note="single-scale encoder self-attention: every token is a query whose reference point is its own centre; "
    "sampling by bilinear grid_sample (align_corners=False, zero padding) as in the reference's pure-torch path",
    test_kwargs={"num_heads": 2, "num_points": 4},
    test_size=(8, 8),
)
class DeformableAttention(Mechanism):
    """Deformable attention (Zhu et al., Deformable DETR, ICLR 2021) on one feature map.

    Each query token predicts, per head, ``num_points`` sampling offsets (in pixels) around its own position and
    a softmax over those points; the output is the weighted sum of the values bilinearly sampled there (zero
    outside the map). Cost is linear in the number of tokens. Parameters and initialisation follow the reference
    (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``).

    Args:
        dim: channels. num_heads: heads (8 as in the paper); head_dim: per-head width. num_points: sampling points
        per head (4). attn_drop: must be 0. proj_drop: output dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = 8,
        head_dim: int | None = None,
        num_points: int = 4,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.num_points = check_int("num_points", num_points)
        inner = self.num_heads * self.head_dim
        self.sampling_offsets = nn.Linear(dim, self.num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, self.num_heads * num_points)
        self.value_proj = nn.Linear(dim, inner)
        self.output_proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: offsets start on rays in ``num_heads`` directions at 1..num_points pixels."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True)[0]
        rays = rays[:, None, :] * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(rays.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.check_input(x)
        b, heads, points = x.shape[0], self.num_heads, self.num_points
        if b == 0 or h == 0 or w == 0:  # grid_sample rejects empty inputs; the projections keep the shape
            return self.output_proj(self.value_proj(x))
        offsets = rearrange(self.sampling_offsets(x), "b y x (h p two) -> (b h) (y x) p two", h=heads, p=points)
        weights = rearrange(self.attention_weights(x), "b y x (h p) -> (b h) (y x) p", h=heads).softmax(-1)
        value = rearrange(self.value_proj(x), "b y x (h d) -> (b h) d y x", h=heads)
        ys = torch.arange(h, dtype=x.dtype, device=x.device)
        xs = torch.arange(w, dtype=x.dtype, device=x.device)
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, h * w, 1, 2)  # (x, y) pixels
        extent = torch.tensor([w, h], dtype=x.dtype, device=x.device)
        grid = 2 * (centres + 0.5 + offsets) / extent - 1  # grid_sample's normalised coordinates, align_corners=False
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (bh) d N P
        out = (sampled * weights[:, None]).sum(-1)
        out = rearrange(out, "(b h) d (y x) -> b y x (h d)", b=b, y=h)
        return self.proj_drop(self.output_proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_points={self.num_points}"
