"""``attnzoo.swap``: run a timm model's attention on attnzoo mechanisms, or swap it for another mechanism.

One table (``FAMILIES``) holds, per timm module family, the recogniser (the exact timm class), the attnzoo mechanism
it is, the mechanism's constructor arguments read off the module, the **weight map** (the module's weights under the
mechanism's parameter names: the same maps the parity tests use), and how the mechanism is installed:

- *path*: the timm block keeps its norms, MLP and residuals, and its attention path (Swin's roll / pad / window
  partition, MaxViT's block / grid partition) becomes one mechanism call on the ``(B, H, W, C)`` map. The block's
  class is switched to a subclass here whose attention method calls ``self.attn(x)``.
- *adapter*: the module is replaced by a small adapter that converts the block's layout to the mechanism's
  channels-last ``(B, *spatial, C)`` and back (``ChannelsFirst`` for NCHW modules, ``FeatureTokens`` for PVTv2's
  ``(B, N, C)`` + ``feat_size`` call, ``TokenAttention`` for ViT's ``(x, attn_mask)`` call).
- *direct*: the mechanism has the module's call signature and layout (VOLO, ConViT MHSA, CrossViT, DaViT channel).

Families: Swin v1 blocks, ViT/DeiT ``Attention``, MaxViT / MaxxViT partition blocks, PVTv2 ``Attention``, DaViT
window blocks and channel attention, VOLO outlook / MHSA / class attention, ConViT GPSA and MHSA, CrossViT cross
attention, EfficientViT-MSRA local window attention, SHViT single-head attention, HaloNet ``HaloAttn``, and timm's
SE / ECA / CBAM / GCNet modules. A recognised module in a configuration the mechanism does not reproduce (e.g. Swin
with ``attn_drop > 0``, an SE with max-pooling) is left alone and listed with the reason.

Known differences: a shifted Swin block whose map is not a multiple of the window (timm pads after the cyclic roll,
so the padding joins the wrapped region) is refused at swap time, and at such sizes a swapped block computes the
pad-then-roll form (torchvision's); a swapped Swin / MaxViT block keeps its construction-time window
(``set_input_size`` may not change it);
MaxxViT's relative-position MLP becomes its evaluated bias table (equal in eval mode; the table is what trains).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.layers.activations import Sigmoid as TimmSigmoid
from timm.layers.cbam import CbamModule
from timm.layers.eca import EcaModule
from timm.layers.global_context import GlobalContext
from timm.layers.halo_attn import HaloAttn
from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp
from timm.layers.squeeze_excite import SEModule
from timm.models import convit, crossvit, davit, efficientvit_msra, maxxvit, pvt_v2, shvit, swin_transformer, volo

from ..mechanisms import create, mechanism_info
from ..mechanisms._channel_conv import reduced_width
from ..mechanisms._windows import flip_table

__all__ = [
    "swap",
    "SwapEntry",
    "Family",
    "FAMILIES",
    "Unsupported",
    "carry_projections",
    # adapters and block subclasses
    "TokenAttention",
    "FeatureTokens",
    "SquareTokens",
    "ChannelsFirst",
    "SwinBlock",
    "MaxxVitPartitionBlock",
    "DaVitSpatialBlock",
    # weight maps: a timm module's weights under the attnzoo mechanism's parameter names
    "swin_window_weights",
    "vit_attention_weights",
    "maxvit_attention_weights",
    "pvt_v2_attention_weights",
    "squeeze_excite_weights",
    "eca_weights",
    "cbam_weights",
    "global_context_weights",
    "halo_weights",
    "outlook_weights",
    "class_attention_weights",
    "gpsa_weights",
    "davit_channel_weights",
    "davit_window_weights",
    "cascaded_group_weights",
    "single_head_weights",
]

Tensor = torch.Tensor


class Unsupported(Exception):
    """A recognised module in a configuration the mechanism does not reproduce (the message says which)."""


@dataclass(frozen=True)
class SwapEntry:
    """One line of ``swap``'s report.

    path: the module's name in the model; original: its timm class; mechanism: the attnzoo mechanism now in its
    place (``None``: left alone, ``reason`` says why). ``carried``: the mechanism's parameters (and buffers) taken
    from the module; ``initialised``: those left as the registry initialises them (a mixer change).
    """

    path: str
    original: str
    mechanism: str | None
    carried: tuple[str, ...] = ()
    initialised: tuple[str, ...] = ()
    reason: str = ""

    @property
    def swapped(self) -> bool:
        return self.mechanism is not None


# ----------------------------------------------------------------------------------------------------- adapters


class TokenAttention(nn.Module):
    """Adapter for a ViT block's ``attn(x, attn_mask=None, is_causal=False)`` call on ``(B, N, C)`` tokens.

    Args:
        mixer: a sequence-layout mechanism; masks are forwarded to mechanisms whose ``forward`` takes ``attn_mask``.
    """

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer
        self.takes_mask = "attn_mask" in inspect.signature(mixer.forward).parameters

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
            if attn_mask is None:
                attn_mask = causal
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & causal
            else:
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        if attn_mask is None:
            return self.mixer(x)
        if not self.takes_mask:
            raise ValueError(f"attn_mask/is_causal given but {type(self.mixer).__name__} takes no attention mask")
        return self.mixer(x, attn_mask=attn_mask)


class FeatureTokens(nn.Module):
    """Adapter for PVTv2's ``attn(x, feat_size)`` call: ``(B, H·W, C)`` tokens ↔ the mechanism's ``(B, H, W, C)``.

    Args:
        mixer: a mechanism taking ``(B, H, W, C)``.
    """

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor, feat_size: list[int] | tuple[int, int]) -> Tensor:
        height, width = feat_size
        return self.mixer(x.reshape(x.shape[0], height, width, x.shape[-1])).reshape(x.shape)


class SquareTokens(nn.Module):
    """Adapter for ConViT's GPSA call on ``(B, N, C)`` patch tokens of a square grid ↔ ``(B, √N, √N, C)``.

    Args:
        mixer: a mechanism taking ``(B, H, W, C)``.
    """

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor) -> Tensor:
        side = round(x.shape[1] ** 0.5)
        if side * side != x.shape[1]:
            raise ValueError(f"x.shape={tuple(x.shape)}: GPSA tokens must form a square grid")
        return self.mixer(x.reshape(x.shape[0], side, side, x.shape[-1])).reshape(x.shape)


class ChannelsFirst(nn.Module):
    """Adapter for NCHW modules (timm's ResNet attention modules, HaloNet): ``(B, C, H, W)`` ↔ ``(B, H, W, C)``.

    Args:
        mixer: a channels-last mechanism.
        residual: add the input to the mechanism's output (GCNet's additive fusion, whose mechanism returns the
            context term only).
    """

    def __init__(self, mixer: nn.Module, residual: bool = False) -> None:
        super().__init__()
        self.mixer = mixer
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.mixer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + out if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class SwinBlock(swin_transformer.SwinTransformerBlock):
    """timm's Swin block with its attention path (roll, pad, partition, mask, reverse) as one mechanism call:
    ``self.attn`` takes the ``(B, H, W, C)`` map (attnzoo ``window`` does shifted windows itself)."""

    def _attn(self, x: Tensor) -> Tensor:
        return self.attn(x)

    def _init_buffers(self) -> None:  # the region mask is part of the mechanism
        self._buffers.pop("attn_mask", None)

    def set_input_size(
        self, feat_size: tuple[int, int], window_size: tuple[int, int], always_partition: bool | None = None
    ) -> None:
        """timm's resize hook: the new map may change the shift (a window mechanism follows), not the window."""
        previous = self.input_resolution, self.always_partition
        self.input_resolution = feat_size
        if always_partition is not None:
            self.always_partition = always_partition
        window, shift = self._calc_window_shift(window_size)
        current = tuple(getattr(self.attn, "window_size", window))
        if tuple(window) != current:
            self.input_resolution, self.always_partition = previous
            raise ValueError(
                f"window_size={tuple(window)} differs from the swapped mechanism's {current}: swap after set_input_size"
            )
        self.window_size, self.shift_size = window, shift
        if hasattr(self.attn, "shift_size"):
            self.attn.shift_size = tuple(shift)


class MaxxVitPartitionBlock(maxxvit.PartitionAttentionCl):
    """timm's MaxViT channels-last block / grid block with partition + attention + reverse as one mechanism call."""

    def _partition_attn(self, x: Tensor) -> Tensor:
        return self.attn(x)

    def set_partition_size(self, partition_size: tuple[int, int]) -> None:
        raise ValueError(f"partition_size={partition_size!r}: the partition of a swapped block is fixed; swap after")


class DaVitSpatialBlock(davit.SpatialBlock):
    """timm's DaViT spatial block with its pad / window partition / attention / reverse as one mechanism call on
    the ``(B, H, W, C)`` map (attnzoo ``window`` without bias or shift, padded keys unmasked as in timm)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        shortcut = self.cpe1(x).flatten(2).transpose(1, 2)
        mixed = self.attn(self.norm1(shortcut).view(batch, height, width, channels))
        x = shortcut + self.drop_path1(mixed.reshape(batch, height * width, channels))
        x = self.cpe2(x.transpose(1, 2).view(batch, channels, height, width))
        if self.mlp is not None:
            x = x.flatten(2).transpose(1, 2)
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            x = x.transpose(1, 2).view(batch, channels, height, width)
        return x


# -------------------------------------------------------------------------------------------------- weight maps


def _dropout(module: nn.Module, name: str) -> float:
    layer = getattr(module, name, None)
    return float(layer.p) if isinstance(layer, nn.Dropout) else 0.0


def _no_attn_drop(module: nn.Module) -> None:
    if _dropout(module, "attn_drop"):
        rate = _dropout(module, "attn_drop")
        raise Unsupported(f"attn_drop={rate} (the fused local mechanisms have no attention dropout)")


def _conv1x1(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], weight.shape[1])


def swin_window_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm ``swin_transformer.WindowAttention`` → attnzoo ``window`` (same names; Swin's table layout)."""
    return {k: v for k, v in attn.state_dict().items() if k != "relative_position_index"}


def _swin_kwargs(block: nn.Module) -> dict[str, Any]:
    attn = block.attn
    _no_attn_drop(attn)
    height, width = block.input_resolution
    if any(block.shift_size) and any(extent % m for extent, m in zip((height, width), block.window_size)):
        raise Unsupported(
            f"input_resolution={block.input_resolution} is not a multiple of window_size={block.window_size}: "
            "timm pads after the cyclic roll (the padding joins the wrapped region), attnzoo's window before it"
        )
    return {
        "num_heads": attn.num_heads,
        "head_dim": attn.qkv.out_features // (3 * attn.num_heads),
        "qkv_bias": attn.qkv.bias is not None,
        "proj_drop": _dropout(attn, "proj_drop"),
        "window_size": tuple(block.window_size),
        "shift_size": tuple(block.shift_size),
        "mask_padding": False,
    }


def vit_attention_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm ``layers.Attention`` → attnzoo ``mhsa`` (qkv, proj, and q_norm / k_norm with ``qk_norm``)."""
    return dict(attn.state_dict())


def _vit_kwargs(attn: nn.Module) -> dict[str, Any]:
    if getattr(attn, "gate", None) is not None:
        raise Unsupported("gated=True (sigmoid output gate)")
    if not isinstance(attn.norm, nn.Identity):
        raise Unsupported("scale_norm=True (norm before the output projection)")
    if attn.proj.bias is None or attn.proj.out_features != attn.qkv.in_features:
        raise Unsupported("proj_bias=False or dim_out != dim")
    qk_norm = not isinstance(attn.q_norm, nn.Identity)
    if qk_norm and not all(isinstance(n, nn.LayerNorm) and n.elementwise_affine for n in (attn.q_norm, attn.k_norm)):
        raise Unsupported(f"q_norm={type(attn.q_norm).__name__} (only an affine LayerNorm)")
    return {
        "num_heads": attn.num_heads,
        "head_dim": attn.head_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": qk_norm,
        "attn_drop": _dropout(attn, "attn_drop"),
        "proj_drop": _dropout(attn, "proj_drop"),
    }


def _vit_finish(mech: nn.Module, attn: nn.Module) -> None:
    if not isinstance(attn.q_norm, nn.Identity):
        mech.q_norm.eps, mech.k_norm.eps = attn.q_norm.eps, attn.k_norm.eps


def maxvit_attention_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm ``maxxvit.AttentionCl`` → attnzoo ``multi_axis``.

    ``head_first`` (the rw models) lays qkv out per head ``[q_h, k_h, v_h]``; ours is ``[q; k; v]`` with heads
    inside. ``RelPosBiasTf``'s ``[heads, 2P-1, 2P-1]`` key − query table is ours as is; ``RelPosBias`` (Swin layout,
    query − key, ``((2P-1)², heads)``) is transposed and flipped. ``RelPosMlp`` (MaxxViT's log-coordinate MLP, a
    function of the offset only) is evaluated once per offset into that table: the same bias in eval mode, but the
    table is then trained directly (the MLP and its training-time dropout are not carried).
    """
    heads, d = attn.num_heads, attn.dim_head
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if attn.head_first:
        weight = weight.reshape(heads, 3, d, -1).transpose(0, 1).reshape(weight.shape)
        bias = None if bias is None else bias.reshape(heads, 3, d).transpose(0, 1).reshape(bias.shape)
    state = {"qkv.weight": weight, "proj.weight": attn.proj.weight, "proj.bias": attn.proj.bias}
    if bias is not None:
        state["qkv.bias"] = bias
    rel = attn.rel_pos
    if isinstance(rel, RelPosBiasTf):
        state["relative_position_bias_table"] = rel.relative_position_bias_table
    elif isinstance(rel, RelPosBias):
        table = rel.relative_position_bias_table.t().reshape(heads, *(2 * p - 1 for p in rel.window_size))
        state["relative_position_bias_table"] = flip_table(table, 2)
    elif isinstance(rel, RelPosMlp):
        training = rel.training
        with torch.no_grad():
            per_offset = rel.bias_act(rel.eval().mlp(rel.rel_coords_log))  # [2P-1, 2P-1, heads], query − key
        rel.train(training)
        per_offset = per_offset * rel.bias_gain if rel.bias_gain is not None else per_offset
        state["relative_position_bias_table"] = flip_table(per_offset.permute(2, 0, 1), 2)
    return state


def _maxvit_kwargs(block: nn.Module) -> dict[str, Any]:
    attn = block.attn
    _no_attn_drop(attn)
    if attn.rel_pos is not None and type(attn.rel_pos) not in (RelPosBias, RelPosBiasTf, RelPosMlp):
        raise Unsupported(f"rel_pos={type(attn.rel_pos).__name__} (attnzoo multi_axis has a bias table only)")
    if getattr(attn.rel_pos, "prefix_tokens", 0):
        raise Unsupported(f"{type(attn.rel_pos).__name__} with prefix tokens")
    if attn.proj.bias is None:
        raise Unsupported("bias=False (attnzoo multi_axis always has a projection bias)")
    return {
        "num_heads": attn.num_heads, "head_dim": attn.dim_head, "qkv_bias": attn.qkv.bias is not None,
        "proj_drop": _dropout(attn, "proj_drop"), "partition_type": "block" if block.partition_block else "grid",
        "window_size": tuple(block.partition_size), "rel_pos_bias": attn.rel_pos is not None,
    }  # fmt: skip


def pvt_v2_attention_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm ``pvt_v2.Attention`` → attnzoo ``spatial_reduction`` (same names: q, kv, sr, norm, proj)."""
    return dict(attn.state_dict())


def _pvt_kwargs(attn: nn.Module) -> dict[str, Any]:
    linear = attn.pool is not None
    if linear and attn.pool.output_size not in (7, (7, 7)):
        raise Unsupported(f"pool output_size={attn.pool.output_size}")
    if attn.norm is not None and attn.norm.eps != 1e-5:
        raise Unsupported(f"norm eps={attn.norm.eps}")
    return {
        "num_heads": attn.num_heads,
        "qkv_bias": attn.q.bias is not None,
        "attn_drop": _dropout(attn, "attn_drop"),
        "proj_drop": _dropout(attn, "proj_drop"),
        "linear": linear,
        "sr_ratio": 1 if linear or attn.sr is None else attn.sr.kernel_size[0],
    }


def _reduction(channels: int, hidden: int) -> int:
    reduction = max(1, channels // hidden)
    if reduced_width(channels, reduction) != hidden:
        raise Unsupported(f"{hidden} hidden channels for {channels} is not channels // reduction for an int reduction")
    return reduction


_ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.GELU)


def _is_sigmoid(module: nn.Module | None) -> bool:
    return type(module) in (nn.Sigmoid, TimmSigmoid)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise Unsupported(what)


def squeeze_excite_weights(se: nn.Module) -> dict[str, Tensor]:
    """timm ``SEModule`` → attnzoo ``squeeze_excite`` (1×1 convs → linears)."""
    state = {"fc1.weight": _conv1x1(se.fc1.weight), "fc2.weight": _conv1x1(se.fc2.weight)}
    if se.fc1.bias is not None:
        state.update({"fc1.bias": se.fc1.bias, "fc2.bias": se.fc2.bias})
    return state


def _se_kwargs(se: nn.Module) -> dict[str, Any]:
    _require(not se.add_maxpool, "add_maxpool=True")
    _require(isinstance(se.bn, nn.Identity), f"norm_layer={type(se.bn).__name__}")
    _require(type(se.act) in _ACTIVATIONS, f"act_layer={type(se.act).__name__} (one of ReLU, SiLU, GELU)")
    _require(_is_sigmoid(se.gate), f"gate_layer={type(se.gate).__name__} (sigmoid only)")
    return {"reduction": _reduction(se.fc1.in_channels, se.fc1.out_channels), "bias": se.fc1.bias is not None}


def _se_finish(mech: nn.Module, se: nn.Module) -> None:
    """The bottleneck activation (ReLU in the SE paper; SiLU in MBConv blocks such as MaxViT's)."""
    mech.act = type(se.act)()


def eca_weights(eca: nn.Module) -> dict[str, Tensor]:
    """timm ``EcaModule`` → attnzoo ``eca`` (same key: ``conv.weight`` ``(1, 1, k)``)."""
    return {"conv.weight": eca.conv.weight}


def _eca_channels(eca: nn.Module, parent: nn.Module | None) -> int:
    """ECA's 1-D conv runs over any channel count: read it off the last conv / norm before it in its parent (timm's
    ResNet blocks: ``bn3`` / ``bn2``; ByobNet blocks: the norm inside ``conv2_kxk``). A wrong guess cannot pass
    silently: the mechanism checks the channel count of every input."""
    channels = None
    for child in parent.children() if parent is not None else ():
        if child is eca:
            break
        for module in child.modules():
            channels = getattr(module, "num_features", None) or getattr(module, "out_channels", None) or channels
    if channels is None:
        raise Unsupported("channel count unknown (no conv or norm before it in its parent)")
    return channels


def _eca_kwargs(eca: nn.Module) -> dict[str, Any]:
    _require(eca.conv2 is None, "use_mlp=True")
    _require(_is_sigmoid(eca.gate), f"gate_layer={type(eca.gate).__name__} (sigmoid only)")
    _require(eca.conv.padding[0] == eca.conv.kernel_size[0] // 2, "padding other than k // 2")
    return {"kernel_size": eca.conv.kernel_size[0]}


def cbam_weights(cbam: nn.Module) -> dict[str, Tensor]:
    """timm ``CbamModule`` → attnzoo ``cbam`` (channel MLP convs → linears; conv + BN of the spatial gate)."""
    channel, spatial = cbam.channel, cbam.spatial.conv
    state = {
        "fc1.weight": _conv1x1(channel.fc1.weight),
        "fc2.weight": _conv1x1(channel.fc2.weight),
        "spatial_conv.weight": spatial.conv.weight,
    }
    if channel.fc1.bias is not None:
        state.update({"fc1.bias": channel.fc1.bias, "fc2.bias": channel.fc2.bias})
    state.update({f"spatial_norm.{k}": v for k, v in spatial.bn.state_dict().items()})
    return state


def _cbam_kwargs(cbam: nn.Module) -> dict[str, Any]:
    channel, spatial = cbam.channel, cbam.spatial
    _require(type(channel.act) is nn.ReLU, f"act_layer={type(channel.act).__name__} (ReLU only)")
    _require(_is_sigmoid(channel.gate) and _is_sigmoid(spatial.gate), "gate_layer other than sigmoid")
    bn = spatial.conv.bn
    plain = all(isinstance(getattr(bn, name, None), (nn.Identity, type(None))) for name in ("act", "drop"))
    _require(isinstance(bn, nn.BatchNorm2d) and plain, "spatial conv + BatchNorm + activation")
    _require(bn.eps == 1e-5 and bn.momentum == 0.1, f"spatial BatchNorm eps={bn.eps}, momentum={bn.momentum}")
    return {
        "reduction": _reduction(channel.fc1.in_channels, channel.fc1.out_channels),
        "spatial_kernel_size": spatial.conv.conv.kernel_size[0],
        "mlp_bias": channel.fc1.bias is not None,
    }


def global_context_weights(gc: nn.Module) -> dict[str, Tensor]:
    """timm ``GlobalContext`` → attnzoo ``global_context`` (attention-pooling conv and ConvMlp → linears)."""
    mlp = gc.mlp_add if gc.mlp_add is not None else gc.mlp_scale
    state = {
        "fc1.weight": _conv1x1(mlp.fc1.weight),
        "fc1.bias": mlp.fc1.bias,
        "norm.weight": mlp.norm.weight,
        "norm.bias": mlp.norm.bias,
        "fc2.weight": _conv1x1(mlp.fc2.weight),
        "fc2.bias": mlp.fc2.bias,
    }
    if gc.conv_attn is not None:
        state.update({"conv_attn.weight": _conv1x1(gc.conv_attn.weight), "conv_attn.bias": gc.conv_attn.bias})
    return state


def _gc_kwargs(gc: nn.Module) -> dict[str, Any]:
    _require((gc.mlp_add is None) != (gc.mlp_scale is None), "fuse_add and fuse_scale together")
    mlp = gc.mlp_add if gc.mlp_add is not None else gc.mlp_scale
    _require(type(mlp.act) is nn.ReLU, f"act_layer={type(mlp.act).__name__} (ReLU only)")
    _require(gc.mlp_scale is None or _is_sigmoid(gc.gate), "gate_layer other than sigmoid")
    return {
        "reduction": _reduction(mlp.fc1.in_channels, mlp.fc1.out_channels),
        "fusion": "add" if gc.mlp_add is not None else "mul",
        "pooling": "att" if gc.conv_attn is not None else "avg",
    }


def _gc_finish(mech: nn.Module, gc: nn.Module) -> None:
    mech.norm.eps = (gc.mlp_add if gc.mlp_add is not None else gc.mlp_scale).norm.eps


def halo_weights(halo: nn.Module) -> dict[str, Tensor]:
    """timm ``HaloAttn`` → attnzoo ``halo``: kv keeps timm's per-head ``[k_h, v_h]`` interleave, so the 1×1 conv
    weights copy over unpermuted."""
    return {
        "q.weight": _conv1x1(halo.q.weight),
        "kv.weight": _conv1x1(halo.kv.weight),
        "height_rel": halo.pos_embed.height_rel,
        "width_rel": halo.pos_embed.width_rel,
    }


def _halo_kwargs(halo: nn.Module) -> dict[str, Any]:
    _require(halo.q.bias is None, "qkv_bias=True")
    _require(halo.dim_out_v == halo.q.in_channels, "dim_out != dim")
    _require(halo.dim_head_qk == halo.dim_head_v, "qk and v head widths differ")
    return {
        "num_heads": halo.num_heads,
        "head_dim": halo.dim_head_qk,
        "window_size": halo.block_size,
        "halo_size": halo.halo_size,
        "stride": halo.block_stride,
        "mask_padding": False,
    }


def outlook_weights(outlook: nn.Module) -> dict[str, Tensor]:
    """timm ``volo.OutlookAttention`` → attnzoo ``outlook`` (same names: v, attn, proj)."""
    return dict(outlook.state_dict())


def _outlook_kwargs(outlook: nn.Module) -> dict[str, Any]:
    return {
        "num_heads": outlook.num_heads,
        "qkv_bias": outlook.v.bias is not None,
        "kernel_size": outlook.kernel_size,
        "padding": outlook.padding,
        "stride": outlook.stride,
        "attn_drop": _dropout(outlook, "attn_drop"),
        "proj_drop": _dropout(outlook, "proj_drop"),
    }


def _plain_mhsa_kwargs(attn: nn.Module) -> dict[str, Any]:
    """timm's own-copy MHSA classes (VOLO ``Attention``, ConViT ``MHSA``): qkv + proj, head_dim = dim / heads."""
    return {
        "num_heads": attn.num_heads,
        "qkv_bias": attn.qkv.bias is not None,
        "attn_drop": _dropout(attn, "attn_drop"),
        "proj_drop": _dropout(attn, "proj_drop"),
    }


def class_attention_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm CrossViT ``CrossAttention`` (wq, wk, wv) or VOLO ``ClassAttention`` (q, kv) → attnzoo ``cls_cross``."""
    if hasattr(attn, "wq"):
        state = {"q.weight": attn.wq.weight, "kv.weight": torch.cat([attn.wk.weight, attn.wv.weight])}
        if attn.wq.bias is not None:
            state.update({"q.bias": attn.wq.bias, "kv.bias": torch.cat([attn.wk.bias, attn.wv.bias])})
    else:
        state = {k: v for k, v in attn.state_dict().items() if k.split(".")[0] in ("q", "kv")}
    return {**state, "proj.weight": attn.proj.weight, "proj.bias": attn.proj.bias}


def _class_attention_kwargs(attn: nn.Module) -> dict[str, Any]:
    query = attn.wq if hasattr(attn, "wq") else attn.q
    return {
        "num_heads": attn.num_heads,
        "head_dim": query.out_features // attn.num_heads,
        "qkv_bias": query.bias is not None,
        "attn_drop": _dropout(attn, "attn_drop"),
        "proj_drop": _dropout(attn, "proj_drop"),
    }


def gpsa_weights(gpsa: nn.Module) -> dict[str, Tensor]:
    """timm ConViT ``GPSA`` → attnzoo ``gated_positional`` (same names: qk, v, proj, pos_proj, gating_param)."""
    return {k: v for k, v in gpsa.state_dict().items() if k != "rel_indices"}


def _gpsa_kwargs(gpsa: nn.Module) -> dict[str, Any]:
    return {
        "num_heads": gpsa.num_heads,
        "qkv_bias": gpsa.qk.bias is not None,
        "local_init": False,
        "locality_strength": gpsa.locality_strength,
        "attn_drop": _dropout(gpsa, "attn_drop"),
        "proj_drop": _dropout(gpsa, "proj_drop"),
    }


def davit_channel_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm DaViT ``ChannelAttention`` → attnzoo ``channel_group``: timm's q, k, v slices of qkv are our V̂, Q̂,
    K̂."""
    w, b = attn.qkv.weight.chunk(3), None if attn.qkv.bias is None else attn.qkv.bias.chunk(3)
    state = {"qkv.weight": torch.cat([w[1], w[2], w[0]]), "proj.weight": attn.proj.weight, "proj.bias": attn.proj.bias}
    if b is not None:
        state["qkv.bias"] = torch.cat([b[1], b[2], b[0]])
    return state


def _davit_channel_kwargs(attn: nn.Module) -> dict[str, Any]:
    return {"num_heads": attn.num_heads, "qkv_bias": attn.qkv.bias is not None}


def davit_window_weights(attn: nn.Module) -> dict[str, Tensor]:
    """timm DaViT ``WindowAttention`` (no bias table) → attnzoo ``window`` with ``rel_pos_bias=False``."""
    return dict(attn.state_dict())


def _davit_window_kwargs(block: nn.Module) -> dict[str, Any]:
    attn = block.attn
    return {
        "num_heads": attn.num_heads,
        "qkv_bias": attn.qkv.bias is not None,
        "window_size": tuple(block.window_size),
        "rel_pos_bias": False,
        "mask_padding": False,
    }


def _install_davit(block: nn.Module, mixer: nn.Module) -> nn.Module:
    block.__class__ = DaVitSpatialBlock
    block.attn = mixer
    return block


def cascaded_group_weights(local: nn.Module) -> dict[str, Tensor]:
    """timm EfficientViT-MSRA ``LocalWindowAttention`` → attnzoo ``cascaded_group`` (ConvNorm ``conv`` = our ``c``;
    the output ConvNorm after the ReLU, ``proj.1``, is our ``proj``)."""
    state = local.attn.state_dict()
    return {
        k.replace(".conv.", ".c.").replace("proj.1.", "proj."): v
        for k, v in state.items()
        if k != "attention_bias_idxs"
    }


def _cascaded_group_kwargs(local: nn.Module) -> dict[str, Any]:
    attn = local.attn
    _require(attn.val_dim * attn.num_heads == local.dim, f"val_dim={attn.val_dim} · num_heads != dim={local.dim}")
    return {"num_heads": attn.num_heads, "qk_dim": attn.key_dim, "window_size": attn.resolution,
            "kernel_size": tuple(dw.conv.kernel_size[0] for dw in attn.dws), "mask_padding": False}  # fmt: skip


def single_head_weights(shsa: nn.Module) -> dict[str, Tensor]:
    """timm SHViT ``SHSA`` → attnzoo ``single_head`` (the output Conv2dNorm after the ReLU, ``proj.1``, is ours
    ``proj``)."""
    return {k.replace("proj.1.", "proj."): v for k, v in shsa.state_dict().items()}


def _single_head_kwargs(shsa: nn.Module) -> dict[str, Any]:
    return {"qk_dim": shsa.qk_dim, "partial_dim": shsa.pdim}


# -------------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Family:
    """How one timm module class becomes an attnzoo mechanism.

    cls: the timm class (recognised exactly, not its subclasses); mechanism: the registered name; dim / kwargs /
    weights: read off the module (kwargs raises ``Unsupported``); finish: settings the constructor does not take
    (norm eps); install: puts a mechanism in place of the module and returns what the parent should hold;
    slot: what a mixer change may put there: ``"grid"`` (any token mechanism on ``(B, H, W, C)``), ``"sequence"``
    (sequence-layout mechanisms on ``(B, N, C)``) or a set of mechanism names (the channel gates; the class-token
    attentions, whose output is one token); hints: settings a different mixer takes from the module when its
    constructor has them.
    """

    name: str
    cls: type
    mechanism: str
    dim: Callable[[nn.Module, nn.Module | None], int]
    kwargs: Callable[[nn.Module], dict[str, Any]]
    weights: Callable[[nn.Module], dict[str, Tensor]]
    install: Callable[[nn.Module, nn.Module], nn.Module]
    slot: str | frozenset[str]
    hints: Callable[[nn.Module], dict[str, Any]] = lambda module: {}
    finish: Callable[[nn.Module, nn.Module], None] = lambda mech, module: None
    in_place: bool = False  # install changes the module itself (so the model may be the module)


def _install_swin(block: nn.Module, mixer: nn.Module) -> nn.Module:
    block.__class__ = SwinBlock
    block.attn = mixer
    block._init_buffers()
    return block


def _install_maxvit(block: nn.Module, mixer: nn.Module) -> nn.Module:
    block.__class__ = MaxxVitPartitionBlock
    block.attn = mixer
    return block


def _swin_hints(block: nn.Module) -> dict[str, Any]:
    attn = block.attn
    return {
        "num_heads": attn.num_heads,
        "qkv_bias": attn.qkv.bias is not None,
        "kernel_size": tuple(block.window_size),
        "window_size": tuple(block.window_size),
        "shift_size": tuple(block.shift_size),
    }


def _halo_hints(halo: nn.Module) -> dict[str, Any]:
    _require(halo.block_stride == 1, f"stride={halo.block_stride}: another mixer would not down-sample")
    return {"num_heads": halo.num_heads}


def _heads_hints(attn: nn.Module) -> dict[str, Any]:
    linear = next(getattr(attn, n) for n in ("qkv", "q", "qk", "v") if isinstance(getattr(attn, n, None), nn.Linear))
    return {"num_heads": attn.num_heads, "qkv_bias": linear.bias is not None}


GATES = frozenset({"squeeze_excite", "eca", "cbam", "global_context"})

# A table, one family per row (a row may wrap once): `fmt: skip` keeps the formatter from putting each of a
# row's twelve fields on its own line.
FAMILIES: tuple[Family, ...] = (
    Family("swin", swin_transformer.SwinTransformerBlock, "window", lambda b, _: b.attn.qkv.in_features, _swin_kwargs,
           lambda b: swin_window_weights(b.attn), _install_swin, "grid", _swin_hints, in_place=True),
    Family("vit", TimmAttention, "mhsa", lambda a, _: a.qkv.in_features, _vit_kwargs, vit_attention_weights,
           lambda a, m: TokenAttention(m), "sequence", _heads_hints, _vit_finish),
    Family("maxvit", maxxvit.PartitionAttentionCl, "multi_axis", lambda b, _: b.attn.qkv.in_features, _maxvit_kwargs,
           lambda b: maxvit_attention_weights(b.attn), _install_maxvit, "grid",
           lambda b: {**_heads_hints(b.attn), "kernel_size": tuple(b.partition_size)}, in_place=True),
    Family("pvt_v2", pvt_v2.Attention, "spatial_reduction", lambda a, _: a.dim, _pvt_kwargs, pvt_v2_attention_weights,
           lambda a, m: FeatureTokens(m), "grid", _heads_hints),
    Family("squeeze_excite", SEModule, "squeeze_excite", lambda s, _: s.fc1.in_channels, _se_kwargs,
           squeeze_excite_weights, lambda s, m: ChannelsFirst(m), GATES, finish=_se_finish),
    Family("eca", EcaModule, "eca", _eca_channels, _eca_kwargs, eca_weights, lambda e, m: ChannelsFirst(m), GATES),
    Family("cbam", CbamModule, "cbam", lambda c, _: c.channel.fc1.in_channels, _cbam_kwargs, cbam_weights,
           lambda c, m: ChannelsFirst(m), GATES),
    Family("global_context", GlobalContext, "global_context",
           lambda g, _: (g.mlp_add if g.mlp_add is not None else g.mlp_scale).fc1.in_channels, _gc_kwargs,
           global_context_weights, lambda g, m: ChannelsFirst(m, residual=g.mlp_add is not None), GATES,
           finish=_gc_finish),
    Family("halo", HaloAttn, "halo", lambda h, _: h.q.in_channels, _halo_kwargs, halo_weights,
           lambda h, m: ChannelsFirst(m), "grid", _halo_hints),
    Family("volo", volo.OutlookAttention, "outlook", lambda o, _: o.v.in_features, _outlook_kwargs, outlook_weights,
           lambda o, m: m, "grid", _heads_hints),
    Family("volo_attention", volo.Attention, "mhsa", lambda a, _: a.qkv.in_features, _plain_mhsa_kwargs,
           lambda a: dict(a.state_dict()), lambda a, m: m, "grid", _heads_hints),
    Family("volo_class_attention", volo.ClassAttention, "cls_cross", lambda a, _: a.q.in_features,
           _class_attention_kwargs, class_attention_weights, lambda a, m: m, frozenset({"cls_cross"})),
    Family("convit_gpsa", convit.GPSA, "gated_positional", lambda a, _: a.dim, _gpsa_kwargs, gpsa_weights,
           lambda a, m: SquareTokens(m), "grid", lambda a: {"num_heads": a.num_heads}),
    Family("convit_mhsa", convit.MHSA, "mhsa", lambda a, _: a.qkv.in_features, _plain_mhsa_kwargs,
           lambda a: dict(a.state_dict()), lambda a, m: m, "sequence", _heads_hints),
    Family("crossvit", crossvit.CrossAttention, "cls_cross", lambda a, _: a.wq.in_features, _class_attention_kwargs,
           class_attention_weights, lambda a, m: m, frozenset({"cls_cross"})),
    Family("davit_channel", davit.ChannelAttention, "channel_group", lambda a, _: a.qkv.in_features,
           _davit_channel_kwargs, davit_channel_weights, lambda a, m: m, frozenset({"channel_group"})),
    Family("davit_window", davit.SpatialBlock, "window", lambda b, _: b.dim, _davit_window_kwargs,
           lambda b: davit_window_weights(b.attn), _install_davit, "grid",
           lambda b: {**_heads_hints(b.attn), "kernel_size": tuple(b.window_size), "window_size": tuple(b.window_size)},
           in_place=True),
    Family("efficientvit_msra", efficientvit_msra.LocalWindowAttention, "cascaded_group", lambda a, _: a.dim,
           _cascaded_group_kwargs, cascaded_group_weights, lambda a, m: ChannelsFirst(m),
           frozenset({"cascaded_group"})),
    Family("shvit", shvit.SHSA, "single_head", lambda a, _: a.dim, _single_head_kwargs, single_head_weights,
           lambda a, m: ChannelsFirst(m), frozenset({"single_head"})),
)  # fmt: skip

_BY_CLASS = {family.cls: family for family in FAMILIES}

# class names of attention-like modules that are listed when no family recognises them
_ATTENTION_LIKE = re.compile(
    r"Attention|Attn|SqueezeExcit|^SE(Module|Layer|Block)?$|^Eca|Cbam|CBAM|GlobalContext|GPSA|MHSA|Outlook"
)

# mechanisms whose projections are [q; k; v] (or q + [k; v]) with heads inside and a ``proj`` on the merged heads
_PROJECTION_LAYOUT = {
    "mhsa": "qkv",
    "window": "qkv",
    "neighborhood": "qkv",
    "multi_axis": "qkv",
    "long_short_distance": "qkv",
    "cross_shaped": "qkv",
    "linear": "qkv",
    "retention": "qkv",
    "mixture_of_heads": "qkv",
    "spatial_reduction": "q+kv",
    "cross": "q+kv",
}


def _split_projections(state: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """``{q, k, v, proj}.{weight, bias}`` from a mechanism state in the ``qkv`` or ``q+kv`` layout."""
    parts: dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        if layout == "qkv" and f"qkv.{kind}" in state:
            parts.update(zip((f"q.{kind}", f"k.{kind}", f"v.{kind}"), state[f"qkv.{kind}"].chunk(3)))
        elif layout == "q+kv" and f"kv.{kind}" in state:
            parts[f"q.{kind}"] = state[f"q.{kind}"]
            parts.update(zip((f"k.{kind}", f"v.{kind}"), state[f"kv.{kind}"].chunk(2)))
        if f"proj.{kind}" in state:
            parts[f"proj.{kind}"] = state[f"proj.{kind}"]
    return parts


def carry_projections(source: dict[str, Tensor], source_mechanism: str, target: nn.Module) -> list[str]:
    """Copy q/k/v and output projections from ``source`` (a state in ``source_mechanism``'s names) into
    ``target`` where layouts are known and shapes agree; returns the target's carried parameter names."""
    target_layout = _PROJECTION_LAYOUT.get(getattr(target, "mechanism_name", ""))
    source_layout = _PROJECTION_LAYOUT.get(source_mechanism)
    if target_layout is None or source_layout is None:
        return []
    parts = _split_projections(source, source_layout)
    wanted: dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        names = ("q", "k", "v")
        if all(f"{n}.{kind}" in parts for n in names):
            if target_layout == "qkv":
                wanted[f"qkv.{kind}"] = torch.cat([parts[f"{n}.{kind}"] for n in names])
            else:
                wanted[f"q.{kind}"] = parts[f"q.{kind}"]
                wanted[f"kv.{kind}"] = torch.cat([parts[f"k.{kind}"], parts[f"v.{kind}"]])
        if f"proj.{kind}" in parts:
            wanted[f"proj.{kind}"] = parts[f"proj.{kind}"]
    own = target.state_dict()
    carried = {k: v for k, v in wanted.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(carried, strict=False)
    return sorted(carried)


# ---------------------------------------------------------------------------------------------------------- swap


def _like(mech: nn.Module, module: nn.Module) -> nn.Module:
    """``mech`` on the module's device and dtype, in its train / eval mode."""
    reference = next(iter(module.parameters()), None)
    if reference is not None:
        mech.to(device=reference.device, dtype=reference.dtype)
    return mech.train(module.training)


def _same_mechanism(family: Family, module: nn.Module, parent: nn.Module | None) -> tuple[nn.Module, tuple[str, ...]]:
    mech = _like(create(family.mechanism, family.dim(module, parent), **family.kwargs(module)), module)
    family.finish(mech, module)
    weights = family.weights(module)
    mech.load_state_dict({k: v.detach() for k, v in weights.items()})
    return mech, tuple(sorted(weights))


def _other_mechanism(
    family: Family, module: nn.Module, parent: nn.Module | None, mixer: str, mixer_kwargs: dict[str, Any]
) -> tuple[nn.Module, tuple[str, ...]]:
    info = mechanism_info(mixer)
    if isinstance(family.slot, frozenset):
        if mixer not in family.slot:
            raise Unsupported(f"mixer={mixer!r}: this slot takes {sorted(family.slot)}")
    elif info.slot != "token" or info.layout == "cross":
        raise Unsupported(f"mixer={mixer!r} is not a self-attention token mixer")
    elif family.slot == "sequence" and info.layout != "sequence":
        raise Unsupported(f"mixer={mixer!r} has layout {info.layout!r}; this slot passes (B, N, C) tokens")
    accepted = inspect.signature(info.cls.__init__).parameters
    hints = {k: v for k, v in family.hints(module).items() if k in accepted}
    mech = _like(create(mixer, family.dim(module, parent), **{**hints, **mixer_kwargs}), module)
    source = family.weights(module)  # the module's weights in its own mechanism's names
    return mech, tuple(carry_projections({k: v.detach() for k, v in source.items()}, family.mechanism, mech))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _find(model: nn.Module) -> list[tuple[str, nn.Module, Family | None]]:
    """Recognised modules (outermost first, nothing inside them), then attention-like modules that neither lie
    inside nor hold a recognised one (a timm block named ``...Attn...`` around a recognised module is not listed)
    and are not attnzoo's own (a model swapped before)."""
    recognised: dict[str, tuple[nn.Module, Family]] = {}
    for path, module in model.named_modules():
        family = _BY_CLASS.get(type(module))
        if family is not None and not any(_inside(path, other) for other in recognised):
            recognised[path] = (module, family)
    found: list[tuple[str, nn.Module, Family | None]] = [(p, m, f) for p, (m, f) in recognised.items()]
    ours = [p for p, m in model.named_modules() if type(m).__module__.startswith(__package__.rpartition(".")[0] + ".")]
    listed: list[str] = []
    for path, module in model.named_modules():
        if not _ATTENTION_LIKE.search(type(module).__name__) or path in recognised or path in ours:
            continue
        if any(_inside(path, other) or _inside(other, path) for other in recognised):
            continue
        if any(_inside(path, other) for other in listed + ours):
            continue
        listed.append(path)
        found.append((path, module, None))
    return found


def _inside(path: str, outer: str) -> bool:
    """``path`` names a module strictly inside ``outer``."""
    return path != outer and (outer == "" or path.startswith(outer + "."))


def swap(model: nn.Module, mixer: str | None = None, strict: bool = False, **mixer_kwargs: Any) -> list[SwapEntry]:
    """Replace every attention module of a timm ``model`` that ``FAMILIES`` recognises by an attnzoo mechanism, in
    place; return one ``SwapEntry`` per attention-like module (swapped, or left alone with the reason).

    Args:
        model: a timm model (or any module holding timm attention modules).
        mixer: ``None`` keeps each module's mechanism and weights (the model computes the same function); a
            registered name builds that mechanism instead, with the q/k/v and output projections carried over where
            the shapes allow and the rest initialised by its constructor (head count, qkv bias and window / kernel
            extent are taken from the module when the mechanism has such arguments).
        strict: raise a ValueError naming the attention-like modules that would be left alone, before changing
            anything.
        **mixer_kwargs: constructor arguments for ``mixer`` (they override what is taken from the module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mixer is None and mixer_kwargs:
        raise ValueError(f"mixer_kwargs={sorted(mixer_kwargs)} need a mixer name (mixer=None keeps each mechanism)")
    if mixer is not None:
        mechanism_info(mixer)  # unknown names raise here, with close matches
    found = _find(model)
    plan: list[tuple[str, nn.Module, Family, nn.Module]] = []
    entries: list[SwapEntry] = []
    for path, module, family in found:
        original = f"{type(module).__module__}.{type(module).__qualname__}"
        if family is None:
            entries.append(SwapEntry(path, original, None, reason="no attnzoo family recognises this class"))
            continue
        if not path and not family.in_place:
            raise ValueError(f"model is itself a {type(module).__name__}: pass a model that holds it")
        parent = model.get_submodule(path.rpartition(".")[0]) if path else None
        try:
            if mixer is None:
                mech, carried = _same_mechanism(family, module, parent)
                initialised: tuple[str, ...] = ()
            else:
                mech, carried = _other_mechanism(family, module, parent, mixer, mixer_kwargs)
                initialised = tuple(sorted(k for k in mech.state_dict() if k not in carried))
        except Unsupported as err:
            entries.append(SwapEntry(path, original, None, reason=f"{family.name}: {err}"))
            continue
        plan.append((path, module, family, mech))
        entries.append(SwapEntry(path, original, mech.mechanism_name, carried, initialised))
    left = [e for e in entries if not e.swapped]
    if strict and left:
        listing = "; ".join(f"{e.path} ({e.original}: {e.reason})" for e in left)
        raise ValueError(f"strict=True: attention modules left alone: {listing}")
    for path, module, family, mech in plan:
        replacement = family.install(module, mech)
        if replacement is not module:
            _set(model, path, replacement)
    return entries
