"""Content-predicted sampling: deformable (offsets and weights per query), dynamic_local (a kernel per location).

References are transformers' Deformable-DETR attention with copied weights and an im2col oracle written here;
float64, eval mode, every parameter randomised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import changed_positions, create_random, rand64

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


# ---------------------------------------------------------------------------------------------------- deformable


@pytest.mark.parametrize("size", [(6, 7), (8, 8)])
def test_deformable_matches_transformers_deformable_detr_attention_at_one_level(size):
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr.configuration_deformable_detr import (
        DeformableDetrConfig,
    )
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    ours = create_random("deformable", 16, num_heads=2, num_points=3)
    with torch.no_grad():
        ours.sampling_offsets.weight.mul_(4)  # offsets of several pixels, many outside the map
    config = DeformableDetrConfig(d_model=16, num_feature_levels=1, disable_custom_kernels=True)
    ref = DeformableDetrMultiscaleDeformableAttention(config, num_heads=2, n_points=3).to(DT).eval()
    ref.load_state_dict(ours.state_dict())
    h, w = size
    x = rand64(2, h, w, 16)
    tokens = x.reshape(2, h * w, 16)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    reference_points = torch.stack(((xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h), -1)[None, :, None].expand(
        2, -1, 1, 2
    )
    expected, _ = ref(
        tokens,
        encoder_hidden_states=tokens,
        reference_points=reference_points,
        spatial_shapes=torch.tensor([[h, w]]),
        spatial_shapes_list=[(h, w)],
        level_start_index=torch.tensor([0]),
    )
    torch.testing.assert_close(ours(x), expected.reshape(2, h, w, 16), **TOL)


def test_deformable_integer_offsets_sample_exact_tokens():
    """Offset weights zero and integer biases: each head reads the value at a fixed displacement (zero outside)."""
    ours = create_random("deformable", 8, num_heads=2, num_points=1)
    with torch.no_grad():
        ours.sampling_offsets.weight.zero_()
        ours.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -2.0]))  # head 0: x+1; head 1: y-2
    x = rand64(1, 5, 6, 8)
    value = ours.value_proj(x).reshape(1, 5, 6, 2, 4)
    expected = torch.zeros_like(value)
    expected[:, :, :-1, 0] = value[:, :, 1:, 0]
    expected[:, 2:, :, 1] = value[:, :-2, :, 1]
    torch.testing.assert_close(ours(x), ours.output_proj(expected.reshape(1, 5, 6, 8)), **TOL)


# ---------------------------------------------------------------------------------------------------- dynamic_local


def dynamic_conv_oracle(m, x):
    """IDynamicDWConvBlock by im2col: out[c, p] = Σ_o kernel[c // head_dim, o, p] · unfold(z)[c, o, p]."""
    k, g = m.kernel_size, m.num_heads
    z = m.conv0(x.permute(0, 3, 1, 2))
    b, c, h, w = z.shape
    kernels = m.hyper(z).reshape(b, g, 1, k * k, h * w).expand(b, g, c // g, k * k, h * w).reshape(b, c, k * k, h * w)
    patches = F.unfold(z, k, padding=k // 2).reshape(b, c, k * k, h * w)
    out = (kernels * patches).sum(2).reshape(b, c, h, w)
    return m.conv1(out).permute(0, 2, 3, 1)


def test_dynamic_local_matches_im2col_oracle():
    ours = create_random("dynamic_local", 16, kernel_size=5, num_heads=4)
    x = rand64(2, 6, 9, 16)
    torch.testing.assert_close(ours(x), dynamic_conv_oracle(ours, x), **TOL)


def test_dynamic_local_with_constant_kernels_is_a_grouped_depthwise_conv():
    ours = create_random("dynamic_local", 16, kernel_size=3, num_heads=4)
    with torch.no_grad():
        ours.hyper[-1].weight.zero_()  # the kernels are now the bias: the same at every pixel
    x = rand64(1, 7, 7, 16)
    static = ours.hyper[-1].bias.reshape(4, 1, 3, 3).repeat_interleave(4, dim=0)
    z = F.conv2d(ours.conv0(x.permute(0, 3, 1, 2)), static, padding=1, groups=16)
    torch.testing.assert_close(ours(x), ours.conv1(z).permute(0, 2, 3, 1), **TOL)


def test_dynamic_local_receptive_field():
    ours = create_random("dynamic_local", 16, kernel_size=3, num_heads=4)
    x = rand64(1, 9, 9, 16)
    changed = changed_positions(ours, x, (4, 4))
    # output p reads z in the 3x3 window of p, with a kernel computed from the same window (the hyper-network's
    # depthwise conv): a 3x3 receptive field
    assert changed[3:6, 3:6].all() and changed.sum() == 9
