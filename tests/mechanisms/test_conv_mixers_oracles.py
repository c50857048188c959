"""Family C mechanisms without a pip reference, against independent re-statements of their official definitions.

Each oracle follows the official code's own computation path (explicit loops, per-sample grouped convs, the NCHW
matrix products, the JAX blocking) with the module's weights, in float64; properties pin what a wrong
implementation would break (a DCT round trip, zero-sum kernels, locality).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import attnzoo

from conftest import nchw, nhwc, rand64, randomize_

TOL = dict(rtol=1e-10, atol=1e-10)


def make(name: str, dim: int, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return attnzoo.create(name, dim, **kwargs).double().eval()


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm of an NCHW tensor, written out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def depthwise_loops(x: torch.Tensor, weight_at) -> torch.Tensor:
    """Σ over k×k offsets of x[c, i + dy, j + dx] · weight_at(c, dy, dx, i, j), zero outside (NCHW, loops over taps)."""
    b, c, h, w = x.shape
    k = weight_at.kernel_size
    r = k // 2
    padded = F.pad(x, (r, r, r, r))
    out = torch.zeros_like(x)
    for dy in range(k):
        for dx in range(k):
            out = out + padded[:, :, dy : dy + h, dx : dx + w] * weight_at(dy, dx)
    return out


# --- convolutional_glu --------------------------------------------------------------------------------------------


def test_convolutional_glu_matches_the_transnext_formula():
    m = randomize_(make("convolutional_glu", 16, mlp_ratio=3.0), std=0.3, seed=0, norms_near_one=True)
    x = rand64(2, 5, 6, 16)
    hidden = m.hidden
    assert hidden == int(2 * 48 / 3)
    h = x @ m.fc1.weight.T + m.fc1.bias
    gate, value = nchw(h[..., :hidden]), h[..., hidden:]
    kernel = m.dwconv.weight[:, 0]

    def tap(dy, dx):
        return kernel[:, dy, dx].view(1, -1, 1, 1)

    tap.kernel_size = 3
    gate = nhwc(depthwise_loops(gate, tap) + m.dwconv.bias.view(1, -1, 1, 1))
    expected = (gelu(gate) * value) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), expected, **TOL)


def test_convolutional_glu_with_identity_conv_is_a_plain_glu():
    m = randomize_(make("convolutional_glu", 16), std=0.3, seed=0, norms_near_one=True)
    with torch.no_grad():
        m.dwconv.weight.zero_()
        m.dwconv.weight[:, 0, 1, 1] = 1.0
        m.dwconv.bias.zero_()
    x = rand64(1, 4, 4, 16)
    gate, value = m.fc1(x).chunk(2, dim=-1)
    torch.testing.assert_close(m(x), m.fc2(gelu(gate) * value), **TOL)


# --- hybrid_attention_block ---------------------------------------------------------------------------------------


def test_hybrid_attention_block_is_window_attention_plus_scaled_cab():
    kwargs = dict(num_heads=2, window_size=4, shift_size=2)
    m = randomize_(make("hybrid_attention_block", 32, **kwargs), std=0.3, seed=0, norms_near_one=True)
    window = make("window", 32, **kwargs)
    window.load_state_dict({k[len("attn.") :]: v for k, v in m.state_dict().items() if k.startswith("attn.")})
    x = rand64(2, 8, 8, 32)
    cab = m.conv_block
    hidden = F.conv2d(nchw(x), cab.conv1.weight, cab.conv1.bias, padding=1)
    feat = F.conv2d(gelu(hidden), cab.conv2.weight, cab.conv2.bias, padding=1)  # HAT CAB: C → C/3 → C
    squeeze = torch.relu(feat.mean(dim=(2, 3)) @ cab.fc1.weight.T + cab.fc1.bias)  # RCAN: C → max(4, C/30)
    gate = torch.sigmoid(squeeze @ cab.fc2.weight.T + cab.fc2.bias)
    expected = window(x) + 0.01 * nhwc(feat * gate[:, :, None, None])
    assert cab.conv1.out_channels == 32 // 3 and cab.fc1.out_features == 4
    assert attnzoo.create("hybrid_attention_block", 180, num_heads=6).conv_block.fc1.out_features == 6  # HAT
    torch.testing.assert_close(m(x), expected, **TOL)


# --- relation_aggregator ------------------------------------------------------------------------------------------


def test_relation_aggregator_local_is_a_learned_offset_affinity():
    m = randomize_(make("relation_aggregator", 16), std=0.3, seed=0, norms_near_one=True)
    x = rand64(2, 7, 6, 16)
    values = F.conv2d(nchw(x), m.conv1.weight, m.conv1.bias)
    affinity = m.attn.weight[:, 0]  # (C, 5, 5): one learned weight per channel and offset

    def tap(dy, dx):
        return affinity[:, dy, dx].view(1, -1, 1, 1)

    tap.kernel_size = 5
    aggregated = depthwise_loops(values, tap) + m.attn.bias.view(1, -1, 1, 1)
    expected = nhwc(F.conv2d(aggregated, m.conv2.weight, m.conv2.bias))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_relation_aggregator_global_matches_torch_multihead_attention():
    m = randomize_(make("relation_aggregator", 32, kind="global", num_heads=2), std=0.3, seed=0, norms_near_one=True)
    ref = nn.MultiheadAttention(32, 2, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    x = rand64(2, 5, 7, 32)
    tokens = x.reshape(2, 35, 32)
    expected = ref(tokens, tokens, tokens, need_weights=False)[0].reshape(x.shape)
    torch.testing.assert_close(m(x), expected, **TOL)


# --- large_small_conv ---------------------------------------------------------------------------------------------


def test_large_small_conv_matches_lsnet_ska_and_lkp():
    dim, groups = 32, 8
    m = randomize_(make("large_small_conv", dim, groups=groups), std=0.3, seed=0, norms_near_one=True)
    x = rand64(2, 9, 7, dim)
    image = nchw(x)
    # LKP, written from the official layer list: Conv-BN-ReLU, DW7-BN, Conv-BN-ReLU, Conv1×1, GroupNorm
    z = torch.relu(bn_eval(F.conv2d(image, m.cv1[0].weight), m.cv1[1]))
    z = bn_eval(F.conv2d(z, m.cv2[0].weight, padding=3, groups=dim // 2), m.cv2[1])
    z = torch.relu(bn_eval(F.conv2d(z, m.cv3[0].weight), m.cv3[1]))
    w = F.group_norm(F.conv2d(z, m.cv4.weight, m.cv4.bias), dim // groups, m.norm.weight, m.norm.bias, m.norm.eps)
    w = w.view(2, dim // groups, 9, 9, 7)
    # SKA as the Triton kernel: channel c uses weight channel c % (C / groups), tap t = kh·3 + kw at (h−1+kh, w−1+kw)
    out = torch.zeros_like(image)
    padded = F.pad(image, (1, 1, 1, 1))
    for c in range(dim):
        for kh in range(3):
            for kw in range(3):
                out[:, c] += padded[:, c, kh : kh + 9, kw : kw + 7] * w[:, c % (dim // groups), kh * 3 + kw]
    torch.testing.assert_close(m(x), nhwc(bn_eval(out, m.bn)), **TOL)


def test_large_small_conv_with_constant_kernels_is_a_depthwise_conv():
    """cv4 = 0 makes GroupNorm's input zero, so every position's kernel is GroupNorm's bias: a static conv."""
    m = randomize_(make("large_small_conv", 16, groups=4), std=0.3, seed=0, norms_near_one=True)
    with torch.no_grad():
        m.cv4.weight.zero_()
        m.cv4.bias.zero_()
    x = rand64(1, 6, 5, 16)
    kernels = m.norm.bias.view(4, 1, 3, 3).repeat(4, 1, 1, 1)  # channel c uses kernel c % 4
    expected = nhwc(bn_eval(F.conv2d(nchw(x), kernels, padding=1, groups=16), m.bn))
    torch.testing.assert_close(m(x), expected, **TOL)


# --- attentive_conv -----------------------------------------------------------------------------------------------


def test_attentive_conv_matches_the_official_definition():
    m = randomize_(make("attentive_conv", 16), std=0.3, seed=0, norms_near_one=True)
    x = rand64(3, 7, 5, 16)
    image = nchw(x)
    b, c = 3, 16
    pooled = F.adaptive_avg_pool1d(F.conv2d(image, m.kernel_proj.weight, m.kernel_proj.bias).view(b, c, 35), 9)
    kernels = gelu(pooled) @ m.kernel_gen.weight.T + m.kernel_gen.bias
    kernels = kernels.view(b, c, 3, 3)
    kernels = kernels - torch.sigmoid(m.difference_control).view(1, -1, 1, 1) * kernels.mean(dim=(2, 3), keepdim=True)
    values = F.conv2d(image, m.x_proj.weight, m.x_proj.bias)

    def tap(dy, dx):  # one kernel per image and channel, the same at every position
        return kernels[:, :, dy, dx, None, None]

    tap.kernel_size = 3
    expected = nhwc(F.conv2d(depthwise_loops(values, tap), m.proj.weight, m.proj.bias))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_attentive_conv_full_inhibition_gives_zero_sum_kernels():
    """σ(λ) → 1 subtracts each kernel's mean: interior responses to a constant map vanish (only proj's bias left)."""
    m = randomize_(make("attentive_conv", 8), std=0.3, seed=0, norms_near_one=True)
    with torch.no_grad():
        m.difference_control.fill_(80.0)
    x = torch.ones(1, 6, 6, 8, dtype=torch.float64) * rand64(8)
    out = m(x)
    torch.testing.assert_close(out[0, 1:-1, 1:-1], m.proj.bias.expand(4, 4, 8), rtol=0, atol=1e-12)


# --- position_channel_guided --------------------------------------------------------------------------------------


def test_position_channel_guided_matches_danet_pam_and_cam():
    m = randomize_(make("position_channel_guided", 32, gamma_init=0.5), std=0.3, seed=0, norms_near_one=True)
    x = rand64(2, 5, 6, 32)
    b, n = 2, 30
    feat = nchw(x).reshape(b, 32, n)  # DANet works on (B, C, N)
    q = (m.query_conv.weight @ feat + m.query_conv.bias[:, None]).permute(0, 2, 1)  # (B, N, C/8)
    k = m.key_conv.weight @ feat + m.key_conv.bias[:, None]  # (B, C/8, N)
    v = m.value_conv.weight @ feat + m.value_conv.bias[:, None]  # (B, C, N)
    pam = torch.bmm(v, torch.softmax(torch.bmm(q, k), dim=-1).permute(0, 2, 1))
    energy = torch.bmm(feat, feat.permute(0, 2, 1))
    cam = torch.bmm(torch.softmax(energy.max(-1, keepdim=True)[0].expand_as(energy) - energy, dim=-1), feat)
    expected = m.gamma_position * pam + m.gamma_channel * cam
    torch.testing.assert_close(m(x), nhwc(expected.reshape(b, 32, 5, 6)), **TOL)


def test_position_channel_guided_danet_zero_init_and_default():
    x = rand64(1, 4, 4, 32)
    assert torch.count_nonzero(make("position_channel_guided", 32, gamma_init=0.0)(x)) == 0
    plain = make("position_channel_guided", 32)
    assert plain.gamma_position is None and torch.count_nonzero(plain(x)) > 0
    with pytest.raises(ValueError, match="gamma_init='a'"):
        attnzoo.create("position_channel_guided", 32, gamma_init="a")


# --- multi_axis_gmlp ----------------------------------------------------------------------------------------------


def _block_images(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    return rearrange(x, "n (gh fh) (gw fw) c -> n (gh gw) (fh fw) c", fh=patch[0], fw=patch[1])


def _unblock_images(x: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    return rearrange(x, "n (gh gw) (fh fw) c -> n (gh fh) (gw fw) c", gh=grid[0], fh=patch[0])


def _gmlp_layer_jax(layer: nn.Module, x: torch.Tensor, size: tuple[int, int], axis: str) -> torch.Tensor:
    """MAXIM's Block/GridGmlpLayer, transcribed with swapaxes as in the JAX code (Dense kernel = weight.T)."""
    h, w = x.shape[1:3]
    if axis == "grid":
        grid, patch = size, (h // size[0], w // size[1])
    else:
        grid, patch = (h // size[0], w // size[1]), size
    blocks = _block_images(x, patch)
    y = gelu(layer.in_project(layer.norm(blocks)))
    u, v = y.chunk(2, dim=-1)
    v = layer.intermediate_norm(v)
    swap = (-1, -3) if axis == "grid" else (-1, -2)
    v = (v.swapaxes(*swap) @ layer.spatial.weight.T + layer.spatial.bias).swapaxes(*swap)
    y = layer.out_project(u * (v + 1.0))
    return _unblock_images(blocks + y, grid, patch)


@pytest.mark.parametrize("size, window, grid", [((8, 8), 4, 4), ((8, 12), (2, 4), (4, 2)), ((6, 6), 3, 2)])
def test_multi_axis_gmlp_matches_the_maxim_layer(size, window, grid):
    m = randomize_(
        make("multi_axis_gmlp", 16, window_size=window, grid_size=grid), std=0.3, seed=0, norms_near_one=True
    )
    layer = m.layer
    x = rand64(2, *size, 16)
    u, v = gelu(layer.in_project(layer.norm_in(x))).chunk(2, dim=-1)
    u = _gmlp_layer_jax(layer.grid_gmlp, u, m.grid_size, "grid")
    v = _gmlp_layer_jax(layer.block_gmlp, v, m.window_size, "block")
    expected = layer.out_project(torch.cat([u, v], dim=-1))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_multi_axis_gmlp_mixes_only_its_block_and_grid_lattice():
    m = randomize_(make("multi_axis_gmlp", 16, window_size=4, grid_size=2), std=0.3, seed=0, norms_near_one=True)
    x = rand64(1, 8, 8, 16)
    base = m(x)
    changed = x.clone()
    changed[:, 0, 0] += rand64(16, seed=5)  # not a constant shift: LayerNorm would remove that
    delta = (m(changed) - base).abs().sum(-1)[0] > 1e-12
    # token (0, 0) reaches its 4×4 block and the grid lattice {0, 4}², nothing else
    reach = torch.zeros(8, 8, dtype=torch.bool)
    reach[:4, :4] = True
    reach[::4, ::4] = True
    assert torch.equal(delta, reach)


def test_cross_gating_matches_the_maxim_block():
    m = randomize_(
        make("multi_axis_gmlp", 16, window_size=2, grid_size=2, cross_gating=True), std=0.3, seed=0, norms_near_one=True
    )
    cgb = m.layer
    x, y = rand64(2, 4, 6, 16, seed=1), rand64(2, 4, 6, 16, seed=2)

    def gating(g: nn.Module, t: torch.Tensor) -> torch.Tensor:
        u, v = gelu(g.in_project(g.norm_in(t))).chunk(2, dim=-1)
        blocks = _block_images(u, (2, 3))  # grid 2×2 on a 4×6 map: patches of 2×3
        u = _unblock_images(
            (blocks.swapaxes(-1, -3) @ g.grid_dense.weight.T + g.grid_dense.bias).swapaxes(-1, -3), (2, 2), (2, 3)
        )
        blocks = _block_images(v, (2, 2))
        v = _unblock_images(
            (blocks.swapaxes(-1, -2) @ g.block_dense.weight.T + g.block_dense.bias).swapaxes(-1, -2), (2, 3), (2, 2)
        )
        return g.out_project(torch.cat([u, v], dim=-1))

    sx, sy = cgb.proj_x(x), cgb.proj_y(y)
    hx = gelu(cgb.in_project_x(cgb.norm_x(sx)))
    hy = gelu(cgb.in_project_y(cgb.norm_y(sy)))
    y_out = cgb.out_project_y(hy * gating(cgb.gating_x, hx)) + sy
    expected = cgb.out_project_x(hx * gating(cgb.gating_y, hy)) + y_out + sx
    torch.testing.assert_close(m(x, y), expected, **TOL)


def test_cross_gating_needs_a_same_grid_context():
    m = attnzoo.create("multi_axis_gmlp", 16, window_size=2, grid_size=2, cross_gating=True)
    with pytest.raises(ValueError, match=r"context of x's shape \(1, 4, 4, 16\), got None"):
        m(torch.randn(1, 4, 4, 16))
    with pytest.raises(ValueError, match=r"got \(1, 5, 16\)"):
        m(torch.randn(1, 4, 4, 16), torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="only taken with cross_gating=True"):
        attnzoo.create("multi_axis_gmlp", 16)(torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16))


# --- dynamic_spectrum ---------------------------------------------------------------------------------------------


def test_dct_matrix_is_scipy_orthonormal_dct2():
    fft = pytest.importorskip("scipy.fft")
    from attnzoo.mechanisms.dynamic_spectrum import dct_matrix

    for n in (1, 5, 8):
        eye = torch.eye(n, dtype=torch.float64).numpy()
        expected = torch.from_numpy(fft.dct(eye, type=2, norm="ortho", axis=0))
        torch.testing.assert_close(dct_matrix(n), expected, **TOL)


def test_dynamic_spectrum_unit_weights_are_the_identity_transform():
    m = randomize_(make("dynamic_spectrum", 16), std=0.3, seed=0, norms_near_one=True)
    with torch.no_grad():
        m.spectral_weight.fill_(1.0)
    x = rand64(2, 5, 7, 16)
    torch.testing.assert_close(m(x), m.pwconv2(gelu(m.pwconv1(x))), **TOL)


def test_dynamic_spectrum_dc_only_weights_give_the_spatial_mean():
    m = randomize_(make("dynamic_spectrum", 16, spectrum_size=6), std=0.3, seed=0, norms_near_one=True)
    with torch.no_grad():
        m.spectral_weight.zero_()
        m.spectral_weight[:, :, 0, 0] = 2.0
    x = rand64(2, 6, 6, 16)
    mean = gelu(m.pwconv1(x)).mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(m(x), m.pwconv2(2.0 * mean).expand_as(x), **TOL)


def test_dynamic_spectrum_weights_depend_on_the_content():
    m = randomize_(make("dynamic_spectrum", 16), std=0.3, seed=0, norms_near_one=True)
    a, b = m.band_weights(rand64(1, 6, 6, 16, seed=1)), m.band_weights(rand64(1, 6, 6, 16, seed=2))
    assert a.shape == (1, 32, 6, 6) and not torch.allclose(a, b)


# --- other modes through the conformance checks -------------------------------------------------------------------

MODES = [
    ("next_vit", {"kind": "ncb", "head_dim": 8}),
    ("relation_aggregator", {"kind": "global", "num_heads": 2}),
    ("position_channel_guided", {"gamma_init": 0.5}),
]


@pytest.mark.parametrize("name, kwargs", MODES, ids=[n for n, _ in MODES])
def test_other_modes_gradcheck_and_compile(name, kwargs):
    m = make(name, 32, **kwargs)
    x = rand64(1, 6, 5, 32).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    compiled = torch.compile(m, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-9, atol=1e-9)


def test_cross_gating_gradcheck_and_compile():
    m = make("multi_axis_gmlp", 16, window_size=2, grid_size=2, cross_gating=True)
    x, y = rand64(1, 4, 6, 16, seed=1).requires_grad_(), rand64(1, 4, 6, 16, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(m, (x, y), fast_mode=True, atol=1e-6, rtol=1e-4)
    compiled = torch.compile(m, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x, y), m(x, y), rtol=1e-9, atol=1e-9)
