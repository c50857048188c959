"""Selective-scan mechanisms against hand-written references in their papers' own data layouts.

The references use ``hand_s6`` (mamba-ssm's ``selective_scan_ref`` layout ``u [B, C, L]``, one token at a time)
with flips and transposes of the feature map, never ``ops.selective_scan`` or its token permutations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo

from conftest import rand64, randomize_


def hand_s6(u, delta, A, B, C, D):
    """``u, delta [B, C, L]``, ``A [C, N]``, ``B, C [B, N, L]``, ``D [C]``: the S6 recurrence, token by token."""
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        state = (
            torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        )
        ys.append((state * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def route_s6(scan, route: int, u):
    """Route ``route`` of an ``_ssm.RouteScan`` on ``u [B, C, L]`` (already in scan order)."""
    width = scan.route_width
    params = slice(route * width, (route + 1) * width)
    x_dbl = torch.einsum("bcl,kc->bkl", u, scan.x_proj[route])
    dt, B, C = x_dbl.split([scan.dt_rank, scan.d_state, scan.d_state], dim=1)
    delta = F.softplus(torch.einsum("bkl,ck->bcl", dt, scan.dt_proj[route]) + scan.dt_bias[params, None])
    return hand_s6(u, delta, -torch.exp(scan.A_log[params]), B, C, scan.D[params])


def build(name, **kwargs):
    torch.manual_seed(0)
    module = attnzoo.create(name, 16, **kwargs).double().eval()
    # move D and the biases off their initial values so every term is exercised
    randomize_(module, std=0.05, perturb=True)
    return module


def test_cross_scan_2d_equals_vmamba_cross_scan_and_merge():
    module = build("cross_scan_2d", d_state=3, chunk_size=4)
    x = rand64(2, 5, 6, 16)
    h, w = 5, 6
    u = F.silu(module.conv(module.in_proj(x).permute(0, 3, 1, 2)))  # [B, C, H, W]
    row, column = u.flatten(2), u.transpose(2, 3).flatten(2)
    inputs = [row, column, row.flip(-1), column.flip(-1)]  # VMamba cross_scan
    ys = [route_s6(module.scan, k, inputs[k]) for k in range(4)]
    b, c = u.shape[:2]
    merged = ys[0] + ys[2].flip(-1) + (ys[1] + ys[3].flip(-1)).reshape(b, c, w, h).transpose(2, 3).flatten(2)
    expected = module.out_proj(module.out_norm(merged.transpose(1, 2))).reshape(x.shape)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def vim_direction(module, direction: int, u):
    """One Vim direction on ``u [B, C, L]`` given in that direction's order: causal conv1d, SiLU, S6."""
    weight, bias = module.conv_weight[direction], module.conv_bias[direction]
    taps = weight.shape[-1]
    padded = F.pad(u, (taps - 1, 0))
    conv = sum(weight[:, 0, j, None] * padded[:, :, j : j + u.shape[-1]] for j in range(taps)) + bias[:, None]
    return route_s6(module.scan, direction, F.silu(conv))


def test_bidirectional_ssm_equals_two_vim_directions():
    module = build("bidirectional_ssm", d_state=4, chunk_size=5)
    x = rand64(2, 3, 4, 16)
    tokens = x.reshape(2, 12, 16)
    u, z = module.in_proj(tokens).chunk(2, dim=-1)
    u = u.transpose(1, 2)
    forward = vim_direction(module, 0, u)
    backward = vim_direction(module, 1, u.flip(-1)).flip(-1)  # Vim: scan the flipped sequence, flip back
    expected = module.out_proj((forward + backward).transpose(1, 2) / 2 * F.silu(z)).reshape(x.shape)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_bidirectional_ssm_with_the_backward_scan_silenced_is_a_causal_mamba():
    """B_bwd = 0 and D_bwd = 0 silence the backward direction: what is left is a plain causal scan."""
    module = build("bidirectional_ssm", d_state=4, chunk_size=3)
    scan = module.scan
    with torch.no_grad():
        scan.x_proj[1, scan.dt_rank : scan.dt_rank + scan.d_state] = 0  # B of the backward route
        scan.D[scan.route_width :] = 0
    x = rand64(1, 10, 16, grad=True)
    (grad,) = torch.autograd.grad(module(x)[0, 4].sum(), x)
    assert grad[0, :5].abs().max() > 0 and grad[0, 5:].abs().max() == 0


def test_multiscale_scan_equals_msvmamba_two_branch_layout():
    module = build("multiscale_scan", d_state=2, chunk_size=4)
    x = rand64(2, 5, 6, 16)
    h, w = 5, 6
    u, z = module.in_proj(x).chunk(2, dim=-1)
    u = u.permute(0, 3, 1, 2)
    fine = F.silu(module.conv(u))
    y_fine = module.out_norm(route_s6(module.fine_scan, 0, fine.flatten(2)).transpose(1, 2))
    coarse = F.silu(module.coarse_conv(u))  # [B, C, 3, 3]
    ch, cw = coarse.shape[-2:]
    row, column = coarse.flatten(2), coarse.transpose(2, 3).flatten(2)
    sequence = torch.cat([row.flip(-1), column, column.flip(-1)], dim=-1)  # MSVMamba: one concatenated scan
    ys = module.out_norm(route_s6(module.coarse_scan, 0, sequence).transpose(1, 2)).transpose(1, 2)
    n = ch * cw
    b, c = ys.shape[:2]
    merged = (
        ys[..., :n].flip(-1).reshape(b, c, ch, cw)
        + ys[..., n : 2 * n].reshape(b, c, cw, ch).transpose(2, 3)
        + ys[..., 2 * n :].flip(-1).reshape(b, c, cw, ch).transpose(2, 3)
    )
    up = F.interpolate(merged, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    expected = module.out_proj((y_fine.reshape(b, h, w, c) + up) * F.silu(z))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_multihead_scan_heads_scan_their_own_routes():
    routes = ("row", "column_snake", "row_reversed", "column")
    module = build("multihead_scan", routes=routes, d_state=3, chunk_size=4)
    x = rand64(2, 4, 5, 16)
    h, w = 4, 5
    u, z = module.in_proj(x).chunk(2, dim=-1)
    u = F.silu(module.conv(u.permute(0, 3, 1, 2)))  # [B, C, H, W]
    d = module.scan.route_width
    snake = u.transpose(2, 3).clone()
    snake[:, :, 1::2] = snake[:, :, 1::2].flip(-1)
    in_route = [u.flatten(2), snake.flatten(2), u.flatten(2).flip(-1), u.transpose(2, 3).flatten(2)]
    heads = []
    for r in range(4):
        y = route_s6(module.scan, r, in_route[r][:, r * d : (r + 1) * d])
        if r == 1:
            y = y.reshape(*y.shape[:2], w, h)
            y[:, :, 1::2] = y[:, :, 1::2].flip(-1)
            y = y.transpose(2, 3).flatten(2)
        elif r == 2:
            y = y.flip(-1)
        elif r == 3:
            y = y.reshape(*y.shape[:2], w, h).transpose(2, 3).flatten(2)
        heads.append(y)
    y = module.out_norm(torch.cat(heads, dim=1).transpose(1, 2)).reshape(2, h, w, -1)
    torch.testing.assert_close(module(x), module.out_proj(y * F.silu(z)), rtol=1e-10, atol=1e-10)


def test_local_attention_mamba_without_its_ssm_branch_is_neighborhood_attention():
    module = build("local_attention_mamba", kernel_size=3, num_heads=2)
    with torch.no_grad():
        module.mamba.out_proj.weight.zero_()
    reference = attnzoo.create("neighborhood", 16, kernel_size=3, num_heads=2).double().eval()
    reference.load_state_dict(module.attention.state_dict())
    x = rand64(2, 6, 7, 16)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        module.mamba.out_proj.weight.normal_()
    assert (module(x) - reference(x)).abs().max() > 1e-3  # the SSM branch contributes when it is on


@pytest.mark.parametrize("head_dim", [8, 16])
def test_noncausal_ssd_state_form_equals_masked_attention_form(head_dim):
    recurrent = build("noncausal_ssd", d_state=6, head_dim=head_dim)
    parallel = build("noncausal_ssd", d_state=6, head_dim=head_dim, mode="quadratic")
    x = rand64(2, 5, 6, 16)
    torch.testing.assert_close(recurrent(x), parallel(x), rtol=1e-10, atol=1e-10)


def test_noncausal_ssd_core_equals_a_hand_written_double_sum():
    from attnzoo.mechanisms.noncausal_ssd import noncausal_ssd_state

    x, dt = rand64(1, 7, 2, 3), F.softplus(rand64(1, 7, 2, seed=1))
    A, D = -torch.exp(rand64(2, seed=2)), rand64(2, seed=3)
    B, C = rand64(1, 7, 4, seed=4), rand64(1, 7, 4, seed=5)
    expected = torch.zeros_like(x)
    for i in range(7):
        for h in range(2):
            expected[0, i, h] = D[h] * x[0, i, h]
            for j in range(7):
                expected[0, i, h] += (C[0, i] @ B[0, j]) * dt[0, j, h] * A[h] * x[0, j, h]
    torch.testing.assert_close(noncausal_ssd_state(x, dt, A, B, C, D), expected, rtol=1e-12, atol=1e-12)
