"""SG-Former self-guided attention: a significance map decides how coarsely each region's keys and values are merged."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import attention
from ._base import BlockState, Mechanism, check_int, check_probability, merge_heads, resolve_heads
from .registry import register_mechanism

__all__ = ["SelfGuidedAttention"]


@register_mechanism(
    "self_guided",
    family="content-routed",
    paper="SG-Former: Self-guided Transformer with Evolving Token Reallocation",
    year=2023,
    complexity="linear",
    reference="OliverRensu/SG-Former sgformer.py::Attention (official; read)",
    receptive_field="global",
    note=(
        "One module holding both halves of SG-Former's attention pair (our fusion; the official blocks alternate a "
        "hybrid-scale block and a self-guided block). Half of the heads: spatial-reduction attention (sr_ratio conv, "
        "LayerNorm, GELU) whose attention map, averaged over those heads and the queries and upsampled (nearest) to "
        "the grid, is the significance map (detached, as official). Other half: tokens sorted by significance, "
        "ascending; the lowest quarter, the middle half and the top quarter are merged by learned linear maps over "
        "runs of merge_sizes[0], [1], [2] consecutive sorted tokens (official sr 4: 49, 14, 7; runs zero-padded at "
        "the end of a group), and all queries attend to the merged tokens. LePE (depthwise 3×3 of a linear map) is "
        "added before the output projection. State between blocks: declares uses_block_state; a block uses the "
        "significance map written by the previous self_guided block of the stage (the official guidance from the "
        "previous block) and its own when there is none (standalone). Not implemented: the local window heads of the "
        "hybrid block and the second (column-major) sorted sequence, which differs from the first only in ties. No "
        "gradient flows through the significance map or the sort; merged tokens pass gradients to every token."
    ),
    test_kwargs={"sr_ratio": 2, "merge_sizes": (4, 2, 1)},
    test_size=(8, 8),
    size_args={"sr_ratio": "ratio"},
)
class SelfGuidedAttention(Mechanism):
    """Self-guided attention (Ren et al., SG-Former, 2023): significance-dependent key/value granularity.

    Input ``(B, H, W, C)``; ``H, W ≥ sr_ratio``.

    Args:
        dim: channels in and out.
        num_heads: attention heads, even: half coarse-global, half self-guided (default ``max(2, 2·(dim // 64))``).
        qkv_bias: bias of the q/kv projections (official False).
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        sr_ratio: spatial down-sampling of the coarse-global heads' keys/values (official 8, 4, 2 by stage).
        merge_sizes: tokens merged into one key in the least, middle and most significant group.
    """

    spatial_ranks = (2,)
    uses_block_state = True

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 4,
        merge_sizes: tuple[int, int, int] = (49, 14, 7),
    ) -> None:
        super().__init__(dim)
        heads = max(2, 2 * (dim // 64)) if num_heads is None else num_heads
        self.num_heads, self.head_dim = resolve_heads(dim, heads, None)
        if self.num_heads % 2:
            raise ValueError(f"num_heads={self.num_heads} must be even (half coarse-global, half self-guided heads)")
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.sr_ratio = check_int("sr_ratio", sr_ratio)
        if not isinstance(merge_sizes, (tuple, list)) or len(merge_sizes) != 3:
            raise ValueError(f"merge_sizes={merge_sizes!r} must be three ints (least, middle, most significant)")
        self.merge_sizes = tuple(check_int("merge_sizes", m) for m in merge_sizes)
        half = dim // 2
        self.q_global = nn.Linear(dim, half, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)
        self.kv_global = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_guided = nn.Linear(dim, half, bias=qkv_bias)
        self.kv_guided = nn.Linear(dim, dim, bias=qkv_bias)
        self.merges = nn.ModuleList(nn.Linear(m, 1) for m in self.merge_sizes)
        self.lepe_linear = nn.Linear(dim, dim)
        self.lepe_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def coarse_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output of the coarse-global heads ``(B, N, C/2)``, significance map ``(B, N)``, detached)."""
        b, rows, cols, _ = x.shape
        h = self.num_heads // 2
        reduced = self.sr(x.permute(0, 3, 1, 2))
        small = reduced.shape[-2:]
        reduced = F.gelu(self.norm(reduced.flatten(2).transpose(1, 2)))
        q = rearrange(self.q_global(x), "b y x (h d) -> b h (y x) d", h=h)
        k, v = rearrange(self.kv_global(reduced), "b m (two h d) -> two b h m d", two=2, h=h)
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        out = F.dropout(weights, self.attn_drop, self.training) @ v
        received = weights.detach().mean(dim=(1, 2)).reshape(b, 1, *small)
        significance = F.interpolate(received, size=(rows, cols), mode="nearest").reshape(b, rows * cols)
        return rearrange(out, "b h n d -> b n (h d)"), significance

    def merged_tokens(self, tokens: torch.Tensor, significance: torch.Tensor) -> torch.Tensor:
        """Keys/values input of the self-guided heads: sorted tokens merged group by group."""
        n, c = tokens.shape[1], tokens.shape[2]
        order = significance.argsort(dim=1, stable=True)
        ranked = tokens.gather(1, order[..., None].expand(-1, -1, c))
        bounds = (0, n // 4, 3 * (n // 4), n)
        merged = []
        for merge, size, start, stop in zip(self.merges, self.merge_sizes, bounds[:-1], bounds[1:]):
            if stop == start:
                continue
            count = math.ceil((stop - start) / size)
            group = F.pad(ranked[:, start:stop], (0, 0, 0, count * size - (stop - start)))
            merged.append(merge(rearrange(group, "b (m j) c -> b m c j", j=size)).squeeze(-1))
        return torch.cat(merged, dim=1)

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> torch.Tensor:
        rows, cols = self.check_input(x)
        if rows < self.sr_ratio or cols < self.sr_ratio:
            raise ValueError(f"x.shape={tuple(x.shape)} needs at least sr_ratio={self.sr_ratio} tokens per axis")
        if state is not None and not isinstance(state, BlockState):
            raise TypeError(f"state must be a BlockState or None, got {type(state).__name__}")
        b, n = x.shape[0], rows * cols
        tokens = x.reshape(b, n, self.dim)
        global_out, significance = self.coarse_global(x)
        earlier = state.read(self.mechanism_name) if state is not None else []
        guide = earlier[-1] if earlier and earlier[-1].shape == significance.shape else significance
        if state is not None:
            state.write(self.mechanism_name, significance)
        keys = self.merged_tokens(tokens, guide)
        h = self.num_heads // 2
        q = rearrange(self.q_guided(tokens), "b n (h d) -> b n h d", h=h)
        k, v = rearrange(self.kv_guided(keys), "b m (two h d) -> two b m h d", two=2, h=h)
        guided_out = merge_heads(attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0))
        lepe = self.lepe_conv(self.lepe_linear(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, self.dim)
        out = self.proj(torch.cat([global_out, guided_out], dim=-1) + lepe)
        return self.proj_drop(out).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, merge_sizes={self.merge_sizes}"
