"""FcaFormer forward cross attention: keys and values extended with merged tokens of the blocks before this one."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import attention
from ._base import (
    BlockState,
    Mechanism,
    check_int,
    check_probability,
    flatten_tokens,
    merge_heads,
    resolve_heads,
    split_qkv,
)
from .registry import register_mechanism

__all__ = ["ForwardCrossAttention"]


@register_mechanism(
    "forward_cross",
    family="cross",
    paper="FcaFormer: Forward Cross Attention in Hybrid Vision Transformer",
    year=2023,
    complexity="quadratic",
    reference="hkzhang-git/FcaFormer image_classification/models/fcaformer.py::FcaBlock, FcaLayer (official; read)",
    receptive_field="global",
    note=(
        "Cross-block state: declares uses_block_state; in a backbone stage each block writes its merged tokens "
        "(depthwise kernel_size×kernel_size conv, stride `stride`, no bias, as the official dw_conv) into the stage's "
        "BlockState and attends over its own tokens plus the merged tokens of up to `max_blocks` earlier blocks "
        "(official cab_max_d=12). Standalone (state=None): no earlier blocks. Differences from the official block, "
        "so that one module works at any input size and position in a stage: the merged tokens are taken from the "
        "mixer input (official: from the block's tokens after the attention residual); the block also attends to its "
        "own merged tokens (official: earlier blocks only), so the merge conv is trained in every block including the "
        "last; the learnable scale factors are per producing block and channel and the depth bias per producing block "
        "and head (official: per consumer and cross token, sized by a fixed resolution); no relative position bias."
    ),
    test_kwargs={"num_heads": 2, "stride": 2, "kernel_size": 3},
    test_size=(6, 6),
    size_args={"kernel_size": "kernel"},
)
class ForwardCrossAttention(Mechanism):
    """Forward cross attention (Zhang et al., FcaFormer, 2023): MHSA whose keys/values also hold earlier blocks' tokens.

    Each call merges its input into ``⌈H/stride⌉·⌈W/stride⌉`` cross tokens with a depthwise strided convolution, scaled
    by learnable per-channel factors. Queries are the N input tokens; keys and values come from the N tokens and, after
    a LayerNorm and the same qkv projection, the cross tokens of this block and of the earlier blocks of the stage
    (``state``, see ``BlockState``), whose logits get a learnable per-head bias of the block that made them.

    Args:
        dim: channels in and out.
        num_heads: attention heads (default ``dim // 32``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias of the qkv projection.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        kernel_size: kernel of the depthwise merge convolution (official 7).
        stride: stride of the merge convolution (official 4).
        max_blocks: earlier blocks whose cross tokens are used, most recent first (official 12).
    """

    spatial_ranks = (2,)
    uses_block_state = True

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 7,
        stride: int = 4,
        max_blocks: int = 12,
    ) -> None:
        super().__init__(dim)
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_drop = check_probability("attn_drop", attn_drop)
        self.kernel_size = check_int("kernel_size", kernel_size, odd=True)
        self.stride = check_int("stride", stride)
        self.max_blocks = check_int("max_blocks", max_blocks, minimum=0)
        inner = self.num_heads * self.head_dim
        self.merge = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False)
        self.cross_scale = nn.Parameter(torch.ones(dim))
        self.cross_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.cross_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))

    def merged_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This block's cross tokens ``(B, M, C)`` from ``x`` ``(B, H, W, C)``."""
        merged = self.merge(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return merged * self.cross_scale

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> torch.Tensor:
        spatial = self.check_input(x)
        if 0 in spatial:
            raise ValueError(f"x.shape={tuple(x.shape)} has an empty spatial axis; forward_cross merges a grid")
        if state is not None and not isinstance(state, BlockState):
            raise TypeError(f"state must be a BlockState or None, got {type(state).__name__}")
        earlier = state.read(self.mechanism_name) if state is not None else []
        earlier = earlier[max(0, len(earlier) - self.max_blocks) :]
        for i, (tokens, _) in enumerate(earlier):
            if tokens.shape[0] != x.shape[0] or tokens.shape[-1] != self.dim:
                raise ValueError(
                    f"cross tokens of earlier block {i} have shape {tuple(tokens.shape)}; they must have batch "
                    f"{x.shape[0]} and dim {self.dim} (blocks sharing a BlockState must share batch and width)"
                )
        own = self.merged_tokens(x)
        if state is not None:
            state.write(self.mechanism_name, (own, self.cross_bias))
        entries = [*earlier, (own, self.cross_bias)]
        cross = self.cross_norm(torch.cat([tokens for tokens, _ in entries], dim=1))
        q, k, v = split_qkv(self.qkv(flatten_tokens(x)), self.num_heads)
        _, k_cross, v_cross = split_qkv(self.qkv(cross), self.num_heads)
        n = q.shape[1]
        cross_bias = [b.to(q.dtype)[:, None].expand(-1, t.shape[1]) for t, b in entries]
        bias = torch.cat([q.new_zeros(self.num_heads, n), *cross_bias], dim=1)
        out = attention(
            q,
            torch.cat([k, k_cross], dim=1),
            torch.cat([v, v_cross], dim=1),
            attn_mask=bias[None, :, None, :],
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(merge_heads(out))).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, max_blocks={self.max_blocks}"
        )
