"""TransNeXt aggregated attention: a zero-padded local window and pooled global tokens in one softmax."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention, merge_attentions, neighborhood_attention
from ._base import Mechanism, check_int, check_resolution, merge_heads, reject_attn_drop, renamed_kwargs, resolve_heads
from ._windows import Padding
from .registry import register_mechanism


@dataclass(frozen=True)
class _Geometry:
    """Resolution-dependent constants (no parameters): see ``aggregated_geometry``."""

    log_length: torch.Tensor  # [H, W]   ln(n_i + P)
    cpb_coords: torch.Tensor  # [U, 2]   distinct log-spaced offsets fed to the CPB MLP
    cpb_index: torch.Tensor  # [H*W, P] index into cpb_coords


def aggregated_geometry(
    spatial: tuple[int, int], pooled: tuple[int, int], kernel_size: int, pretrain_size: tuple[int, int]
) -> _Geometry:
    """Length scale and continuous-position-bias coordinates of TransNeXt for an ``(H, W)`` map.

    n_i = in-bounds positions of the ``kernel_size``² window centred on i (zero padding: 9 inside, 6 on edges,
    4 at corners for k=3). Pooled token m sits at the average-pooled coordinate p̄_m; the CPB input for (i, m) is
    sign(Δ)·log2(1 + |Δ|)/3 with Δ = 8·(p_i − p̄_m)/(S − 1) per axis (S = pretrain size), de-duplicated.
    """
    r = kernel_size // 2
    counts, deltas = [], []
    for extent, pool, pretrain in zip(spatial, pooled, pretrain_size):
        axis = torch.arange(extent, dtype=torch.float64)
        counts.append((axis + r).clamp(max=extent - 1) - (axis - r).clamp(min=0) + 1)
        pooled_axis = F.adaptive_avg_pool1d(axis[None, None], pool)[0, 0]
        deltas.append((axis[:, None] - pooled_axis[None, :]) / (pretrain - 1) * 8)  # [L, pool]
    n_pooled = pooled[0] * pooled[1]
    log_length = torch.log(counts[0][:, None] * counts[1][None, :] + n_pooled)
    dy = deltas[0][:, None, :, None].expand(spatial[0], spatial[1], pooled[0], pooled[1])
    dx = deltas[1][None, :, None, :].expand(spatial[0], spatial[1], pooled[0], pooled[1])
    pairs = torch.stack([dy, dx], dim=-1).reshape(-1, 2)
    coords, index = torch.unique(pairs, dim=0, return_inverse=True)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return _Geometry(log_length, coords, index.reshape(spatial[0] * spatial[1], n_pooled))


@register_mechanism(
    "aggregated",
    family="local",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
    year=2023,
    complexity="quadratic",
    reference="DaiShiResearch/TransNeXt classification/transnext_native.py::AggregatedAttention (official; no pip)",
    needs_input_size=True,
    test_kwargs={"num_heads": 2, "kernel_size": 3, "sr_ratio": 2, "input_resolution": (6, 6)},
    test_size=(6, 6),
    size_args={"kernel_size": "kernel", "sr_ratio": "ratio"},
)
class AggregatedAttention(Mechanism):
    """Aggregated attention from TransNeXt (Shi, 2023): pixel-focused local window ∪ pooled tokens, one softmax.

    Per head: q̂_i = (n(q_i) + e)·softplus(τ)·ln(n_i + P) (n = ℓ2 normalisation, e a learned query embedding,
    n_i the in-bounds positions of i's window, P the pooled tokens). Local keys: the ``kernel_size``² window
    centred on i with zero padding (out-of-bounds slots dropped), logits q̂·n(k_j) + b[slot]. Pooled keys from
    LN(AdaptiveAvgPool_{H/sr×W/sr}(GELU(Conv1×1(x)))) through the same kv projection, logits q̂·n(k̄_m) +
    CPB(i, m) (an MLP on log-spaced relative coordinates). One softmax over both sets gives (α, β); the output
    Σ_j (α_ij + n(q_i)·T_j + t_j) v_j + Σ_m β_im v̄_m (learnable tokens T, t) is projected.

    ``input_resolution`` builds the geometry for that size up front (and is the default ``pretrain_size``);
    other sizes work too, with H//sr × W//sr pooled tokens and geometry built on first use. TransNeXt's last
    stage (sr = 1) uses a different module (plain length-scaled cosine attention), not this one.
    """

    @renamed_kwargs(window_size="kernel_size")
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 3,
        sr_ratio: int = 8,
        input_resolution: int | Sequence[int] = (56, 56),
        pretrain_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim)
        reject_attn_drop(attn_drop)
        self.kernel_size = check_int("kernel_size", kernel_size, 3, odd=True)
        self.sr_ratio = check_int("sr_ratio", sr_ratio)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, None)
        self.input_resolution = check_resolution("input_resolution", input_resolution, minimum=sr_ratio)
        self.pretrain_size = check_resolution(
            "pretrain_size", self.input_resolution if pretrain_size is None else pretrain_size, minimum=2
        )
        heads, d, kk = self.num_heads, self.head_dim, kernel_size**2

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.temperature = nn.Parameter(torch.full((heads, 1, 1), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, 1, d), std=0.02))
        self.relative_pos_bias_local = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, kk), std=0.0004))
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, d, kk), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(heads, 1, kk))
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # float64 constants kept outside the buffers so module.to(dtype) round trips cannot round them
        self._geometry: dict[tuple[int, int], _Geometry] = {self.input_resolution: self._build(self.input_resolution)}

    def pooled_size(self, spatial: tuple[int, int]) -> tuple[int, int]:
        return spatial[0] // self.sr_ratio, spatial[1] // self.sr_ratio

    def _build(self, spatial: tuple[int, int]) -> _Geometry:
        return aggregated_geometry(spatial, self.pooled_size(spatial), self.kernel_size, self.pretrain_size)

    def geometry(self, spatial: tuple[int, int], device: torch.device | None = None) -> _Geometry:
        """Geometry for an ``(H, W)`` map (built on first use for sizes other than ``input_resolution``)."""
        if spatial not in self._geometry:
            self._geometry[spatial] = self._build(spatial)
        geo = self._geometry[spatial]
        if device is not None and geo.cpb_index.device != device:
            geo = self._geometry[spatial] = _Geometry(
                *(t.to(device) for t in (geo.log_length, geo.cpb_coords, geo.cpb_index))
            )
        return geo

    def local_table(self) -> torch.Tensor:
        """The k×k slot bias as the engine's ``[heads, 2k-1, 2k-1]`` key − query table (slot = offset + k//2)."""
        k, r = self.kernel_size, self.kernel_size // 2
        return F.pad(self.relative_pos_bias_local.reshape(self.num_heads, k, k), (r, r, r, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.check_input(x)
        if min(spatial) < self.sr_ratio:
            raise ValueError(f"sr_ratio={self.sr_ratio} needs H, W >= {self.sr_ratio}, got x spatial shape {spatial}")
        geo = self.geometry(spatial, x.device)
        dtype, heads, k = x.dtype, self.num_heads, self.kernel_size

        q = F.normalize(rearrange(self.q(x), "b y x (h d) -> b y x h d", h=heads), dim=-1)
        scale = F.softplus(self.temperature).reshape(heads, 1) * geo.log_length.to(dtype)[..., None, None]
        q_hat = (q + self.query_embedding.reshape(heads, -1)) * scale
        key, value = rearrange(self.kv(x), "b y x (two h d) -> two b y x h d", two=2, h=heads)
        key = F.normalize(key, dim=-1)

        # Local window centred on each query, zero padded: pad every side by k//2 and drop the padded keys.
        halo = Padding(spatial, (k // 2,) * 2, (k // 2,) * 2)
        local, local_lse = neighborhood_attention(
            *(halo.pad(t) for t in (q_hat, key, value)),
            kernel_size=k,
            scale=1.0,
            return_lse=True,
            rel_pos_bias=self.local_table().to(dtype),
            key_bias=halo.key_bias(dtype, x.device),
        )
        local, local_lse = halo.crop(local), halo.crop(local_lse)

        pooled = F.adaptive_avg_pool2d(F.gelu(self.sr(x.permute(0, 3, 1, 2))), self.pooled_size(spatial))
        pooled = self.norm(pooled.permute(0, 2, 3, 1))
        pooled_key, pooled_value = rearrange(self.kv(pooled), "b y x (two h d) -> two b (y x) h d", two=2, h=heads)
        cpb = self.cpb_fc2(F.relu(self.cpb_fc1(geo.cpb_coords.to(dtype))))  # [U, heads]
        cpb = cpb[geo.cpb_index].permute(2, 0, 1)  # [heads, N, P]
        glob, glob_lse = attention(
            q_hat, F.normalize(pooled_key, dim=-1), pooled_value, scale=1.0, attn_mask=cpb, return_lse=True
        )
        out, _ = merge_attentions([local, glob], [local_lse, glob_lse])

        # Query-dependent learnable-token weights on the zero-padded window values.
        windows = F.unfold(rearrange(value, "b y x h d -> b (h d) y x"), k, padding=k // 2)
        windows = rearrange(windows, "b (h d j) (y x) -> b y x h j d", h=heads, j=k * k, y=spatial[0])
        token_weights = torch.einsum("byxhd,hdj->byxhj", q, self.learnable_tokens) + self.learnable_bias.reshape(
            heads, -1
        )
        out = out + torch.einsum("byxhj,byxhjd->byxhd", token_weights, windows)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, sr_ratio={self.sr_ratio}, "
            f"input_resolution={self.input_resolution}, pretrain_size={self.pretrain_size}"
        )
