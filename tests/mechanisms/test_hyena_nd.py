"""hyena_nd: the FFT long convolution equals a direct sum over offsets; the order-N gated recurrence by hand."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.mechanisms.hyena_nd import fft_conv2d

from conftest import rand64


def direct_conv2d(u, kernel):
    """``y[c, i, j] = Σ_{i', j'} kernel[c, i − i' + H − 1, j − j' + W − 1]·u[c, i', j']`` with explicit loops."""
    height, width = u.shape[-2:]
    y = torch.zeros_like(u)
    for i in range(height):
        for j in range(width):
            for i2 in range(height):
                for j2 in range(width):
                    y[..., i, j] += kernel[:, i - i2 + height - 1, j - j2 + width - 1] * u[..., i2, j2]
    return y


def test_fft_conv2d_is_the_linear_not_circular_convolution():
    u, kernel = rand64(2, 3, 4, 5), rand64(3, 7, 9, seed=1)
    torch.testing.assert_close(fft_conv2d(u, kernel), direct_conv2d(u, kernel), rtol=1e-10, atol=1e-10)


def test_hyena_nd_equals_the_gated_recurrence_with_direct_convolutions():
    torch.manual_seed(0)
    module = attnzoo.create("hyena_nd", 8, order=2, filter_hidden=8).double().eval()
    x = rand64(1, 4, 3, 8)
    projected = module.short_filter(module.in_proj(x).permute(0, 3, 1, 2))
    x1, x2, v = projected.chunk(3, dim=1)
    kernels = module.filters(4, 3, torch.float64)
    y = x1 * (direct_conv2d(v, kernels[0]) + module.skip[0, :, None, None] * v)
    y = x2 * (direct_conv2d(y, kernels[1]) + module.skip[1, :, None, None] * y)
    expected = module.out_proj(y.permute(0, 2, 3, 1))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_hyena_filters_decay_away_from_the_centre():
    torch.manual_seed(0)
    module = attnzoo.create("hyena_nd", 8).double()
    with torch.no_grad():
        module.filter_mlp[1].frequency.zero_()  # first Sin outputs 0: the FFN output is a constant
        module.filter_mlp[2].bias.fill_(1.0)
        module.filter_mlp[4].weight.fill_(0.1)  # so the decay window alone shapes the filter
    kernels = module.filters(5, 5, torch.float64)
    centre, corner = kernels[..., 4, 4], kernels[..., 0, 0]
    assert bool((centre.abs() > corner.abs()).all())
