"""Family C mechanisms against pip reference classes (timm, transformers) with copied weights, float64, 1e-10.

Protocol: eval mode, every parameter and BatchNorm statistic randomised, state dicts mapped key by key and loaded
strictly (nothing left unmapped on either side).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import attnzoo

from conftest import nchw, nhwc, rand64, randomize_

timm = pytest.importorskip("timm")

TOL = dict(rtol=1e-10, atol=1e-10)


def make(name: str, dim: int, **kwargs) -> nn.Module:
    return attnzoo.create(name, dim, **kwargs).double().eval()


def copy_into(target: nn.Module, source_state: dict[str, torch.Tensor], key_map: dict[str, str]) -> None:
    """``target[key_map[k]] = source_state[k]`` for every source key (reshaped to the target's shape), strictly."""
    own = target.state_dict()
    source_state = {k: v for k, v in source_state.items() if not k.endswith("num_batches_tracked")}
    mapped = {key_map[k]: v.reshape(own[key_map[k]].shape) for k, v in source_state.items() if k in key_map}
    unmapped = [k for k in source_state if k not in key_map]
    assert not unmapped, unmapped
    missing, unexpected = target.load_state_dict(mapped, strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")] and not unexpected, (missing, unexpected)


def bn_keys(prefix: str, target: str) -> dict[str, str]:
    return {f"{prefix}.{k}": f"{target}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}


# --- coordinate ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, size", [(32, (7, 9)), (96, (5, 4)), (320, (3, 6))])
def test_coordinate_matches_timm_coord_attn(dim, size):
    from timm.layers.coord_attn import CoordAttn

    ref = randomize_(CoordAttn(dim, rd_channels=max(8, dim // 32), bias=True), seed=0).double().eval()
    ours = make("coordinate", dim)
    keys = {f"{m}.{p}": f"{m}.{p}" for m in ("conv1", "conv_h", "conv_w") for p in ("weight", "bias")}
    copy_into(ours, ref.state_dict(), {**keys, **bn_keys("bn1", "bn1")})
    x = rand64(2, *size, dim)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)


def test_coordinate_output_sees_its_row_and_column_only():
    m = randomize_(make("coordinate", 32), seed=0).double().eval()
    x = rand64(1, 6, 7, 32)
    y = m(x)
    changed = x.clone()
    changed[:, 4, 5] += 1.0
    out = m(changed)
    torch.testing.assert_close(out[:, 0, 0], y[:, 0, 0], rtol=0, atol=0)  # neither row 4 nor column 5
    assert not torch.allclose(out[:, 4, 0], y[:, 4, 0]) and not torch.allclose(out[:, 0, 5], y[:, 0, 5])


# --- gated_cnn ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"conv_ratio": 0.5, "kernel_size": 5}, {"expansion_ratio": 2.0}])
def test_gated_cnn_matches_timm_gated_conv_block_mixer(kwargs):
    """timm's block is x + fc2(...) of norm(x); with its norm the identity (weight 1, bias 0) and no LayerScale /
    drop path, block(x) − x is exactly the mixer."""
    from timm.models.mambaout import GatedConvBlock

    dim = 24
    ref = randomize_(GatedConvBlock(dim, **kwargs), seed=0).double().eval()
    with torch.no_grad():
        ref.norm.weight.fill_(1.0)
        ref.norm.bias.zero_()
    ours = make("gated_cnn", dim, **kwargs)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("norm.")}
    copy_into(ours, state, {k: k for k in state})
    x = rand64(2, 7, 6, dim)
    torch.testing.assert_close(ours(ref.norm(x)), ref(x) - x, **TOL)


# --- depthwise_mixer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, size", [(32, (9, 9)), (40, (5, 12))])
def test_depthwise_mixer_matches_timm_convnext_conv_dw(dim, size):
    from timm.models.convnext import ConvNeXtBlock

    block = randomize_(ConvNeXtBlock(dim, conv_bias=True), seed=0).double().eval()
    ours = make("depthwise_mixer", dim)
    copy_into(
        ours,
        {k: v for k, v in block.state_dict().items() if k.startswith("conv_dw.")},
        {"conv_dw.weight": "conv_dw.weight", "conv_dw.bias": "conv_dw.bias"},
    )
    x = rand64(2, *size, dim)
    torch.testing.assert_close(ours(x), nhwc(block.conv_dw(nchw(x))), **TOL)


# --- next_vit -----------------------------------------------------------------------------------------------------


def _zero_mlp(block: nn.Module) -> None:
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()


def test_next_vit_ncb_matches_timm_next_conv_block():
    """NextConvBlock(x) = x + MHCA(x) + MLP(...); with fc2 zeroed, block(x) − x is MHCA(x)."""
    from timm.models.nextvit import NextConvBlock

    dim = 64
    ref = randomize_(NextConvBlock(dim, dim, head_dim=16), seed=0).double().eval()
    _zero_mlp(ref)
    ours = make("next_vit", dim, head_dim=16)
    state = {k: v for k, v in ref.state_dict().items() if k.startswith("mhca.")}
    copy_into(ours, state, {k: k for k in state})
    x = rand64(2, 7, 5, dim)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))) - x, **TOL)


NTB_CASES = [(128, 32, 2, (8, 6)), (160, 32, 1, (5, 7)), (128, 32, 4, (8, 8))]


@pytest.mark.parametrize("dim, head_dim, sr_ratio, size", NTB_CASES)
def test_next_vit_ntb_matches_timm_next_transformer_block(dim, head_dim, sr_ratio, size):
    """NextTransformerBlock(x) = cat(z, o + MHCA(o)) + MLP(...); with fc2 zeroed it is the mixed map we return.
    (head_dim 32: timm rounds the MHSA width to a multiple of 32, ours to a multiple of head_dim.)"""
    from timm.models.nextvit import NextTransformerBlock

    ref = (
        randomize_(NextTransformerBlock(dim, dim, drop_path=0.0, sr_ratio=sr_ratio, head_dim=head_dim), seed=0)
        .double()
        .eval()
    )
    _zero_mlp(ref)
    ours = make("next_vit", dim, kind="ntb", head_dim=head_dim, sr_ratio=sr_ratio)
    assert (ours.mhsa_dim, ours.mhca_dim) == (ref.mhsa_out_chs, ref.mhca_out_chs)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith(("mlp.", "norm2."))}
    key_map = {k: k for k in state}
    for prefix, target in (("patch_embed", "patch_embed"), ("projection", "projection")):
        key_map[f"{prefix}.conv.weight"] = f"{target}.0.weight"
        key_map.update(bn_keys(f"{prefix}.norm", f"{target}.1"))
    copy_into(ours, state, key_map)
    x = rand64(2, *size, dim)
    torch.testing.assert_close(ours(x), nhwc(ref(nchw(x))), **TOL)


def test_next_vit_errors_name_the_argument():
    with pytest.raises(ValueError, match="dim=48 must be divisible by head_dim=32"):
        attnzoo.create("next_vit", 48)
    with pytest.raises(ValueError, match="leaves 0 MHCA channels"):
        attnzoo.create("next_vit", 32, kind="ntb")
    with pytest.raises(ValueError, match="kind='mhsa'"):
        attnzoo.create("next_vit", 32, kind="mhsa")
    with pytest.raises(ValueError, match="sr_ratio=4 pools runs of 16 tokens"):
        attnzoo.create("next_vit", 32, kind="ntb", head_dim=8, sr_ratio=4)(torch.randn(1, 3, 3, 32))


# --- conv_projection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, heads, size", [(64, 1, (7, 7)), (48, 3, (6, 9)), (32, 2, (5, 4))])
def test_conv_projection_matches_transformers_cvt_attention(dim, heads, size):
    cvt = pytest.importorskip("transformers.models.cvt.modeling_cvt")
    ref = (
        randomize_(
            cvt.CvtAttention(
                num_heads=heads,
                embed_dim=dim,
                kernel_size=3,
                padding_q=1,
                padding_kv=1,
                stride_q=1,
                stride_kv=2,
                qkv_projection_method="dw_bn",
                qkv_bias=True,
                attention_drop_rate=0.0,
                drop_rate=0.0,
                with_cls_token=False,
            ),
            seed=0,
        )
        .double()
        .eval()
    )
    ours = make("conv_projection", dim, num_heads=heads)
    key_map = {"output.dense.weight": "proj.weight", "output.dense.bias": "proj.bias"}
    for n in ("query", "key", "value"):
        conv = f"attention.convolution_projection_{n}.convolution_projection"
        key_map[f"{conv}.convolution.weight"] = f"conv_{n[0]}.0.weight"
        key_map.update(bn_keys(f"{conv}.normalization", f"conv_{n[0]}.1"))
        for p in ("weight", "bias"):
            key_map[f"attention.projection_{n}.{p}"] = f"{n[0]}.{p}"
    copy_into(ours, ref.state_dict(), key_map)
    x = rand64(2, *size, dim)
    expected = ref(x.reshape(2, -1, dim), *size).reshape(x.shape)
    torch.testing.assert_close(ours(x), expected, **TOL)
