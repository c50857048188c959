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


def plain_filters(module, height, width):
    """The filters as first written: the whole FFN on every offset's full feature vector
    ``[δy, δx, sin(kπδy), sin(kπδx), cos(kπδy), cos(kπδx)]``, times the decay window, channels last."""
    dy = torch.arange(-(height - 1), height, dtype=torch.float64) / max(height - 1, 1)
    dx = torch.arange(-(width - 1), width, dtype=torch.float64) / max(width - 1, 1)
    grid_y, grid_x = torch.meshgrid(dy, dx, indexing="ij")
    bands = torch.arange(1, module.num_bands + 1, dtype=torch.float64) * torch.pi
    angles = torch.cat([grid_y[..., None] * bands, grid_x[..., None] * bands], dim=-1)
    positions = torch.cat([grid_y[..., None], grid_x[..., None], torch.sin(angles), torch.cos(angles)], dim=-1)
    kernel = module.filter_mlp(positions)  # [2H−1, 2W−1, order·dim]
    decay = module.decay.repeat(module.order)
    window = torch.exp(-decay * (torch.sqrt(grid_y**2 + grid_x**2) / 2**0.5)[..., None])
    return (kernel * window).permute(2, 0, 1).unflatten(0, (module.order, module.dim))


def test_filters_equal_the_ffn_on_every_offset():
    torch.manual_seed(0)
    module = attnzoo.create("hyena_nd", 8, order=3, filter_hidden=8, num_bands=3).double()
    for height, width in ((4, 3), (1, 5), (6, 6)):
        expected = plain_filters(module, height, width)
        torch.testing.assert_close(module.filters(height, width, torch.float64), expected, rtol=1e-10, atol=1e-10)


def test_channel_blocks_give_the_unblocked_result(monkeypatch):
    from attnzoo.mechanisms import _base, hyena_nd

    torch.manual_seed(0)
    module = attnzoo.create("hyena_nd", 8, filter_hidden=8).double().eval()
    x = rand64(2, 5, 4, 8)
    whole = module(x)
    spectrum_bytes = 2 * hyena_nd.fft_size(9) * (hyena_nd.fft_size(7) // 2 + 1) * 16  # batch · rows · cols · complex128
    monkeypatch.setattr(_base, "CPU_BLOCK_BYTES", 3 * spectrum_bytes)  # blocks of 3, 3, 2 channels
    assert [(c.start, c.stop) for c in _base.cpu_blocks(8, spectrum_bytes, x.device)] == [(0, 3), (3, 6), (6, 8)]
    torch.testing.assert_close(module(x), whole, rtol=1e-12, atol=1e-12)
