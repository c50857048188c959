"""attnzoo.ops.selective_scan: chunkwise form = recurrence = a hand-written double sum; orders; dtypes; errors."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops import selective_scan

from conftest import rand64


def inputs(batch=2, length=13, channels=6, d_state=3, groups=None, seed=0, grad=False):
    """Random scan inputs in float64 with a decaying A and positive Δ."""
    b_shape = (batch, length, d_state) if groups is None else (batch, length, groups, d_state)
    u = rand64(batch, length, channels, seed=seed, grad=grad)
    delta = torch.nn.functional.softplus(rand64(batch, length, channels, seed=seed + 1)).detach().requires_grad_(grad)
    A = (-torch.exp(rand64(channels, d_state, seed=seed + 2))).detach().requires_grad_(grad)
    B = rand64(*b_shape, seed=seed + 3, grad=grad)
    C = rand64(*b_shape, seed=seed + 4, grad=grad)
    D = rand64(channels, seed=seed + 5, grad=grad)
    return u, delta, A, B, C, D


def hand_scan(u, delta, A, B, C, D):
    """``y_t[d] = Σ_{τ≤t} Σ_n C_t[n]·exp(A[d,n]·Σ_{τ<s≤t} Δ_s[d])·Δ_τ[d]·B_τ[n]·u_τ[d] + D[d]·u_t[d]``, one group."""
    batch, length = u.shape[:2]
    y = torch.zeros_like(u)
    for b in range(batch):
        for t in range(length):
            for tau in range(t + 1):
                decay = torch.exp(A * delta[b, tau + 1 : t + 1].sum(0)[:, None])  # [channels, d_state]
                y[b, t] += (decay * C[b, t] * B[b, tau]).sum(-1) * delta[b, tau] * u[b, tau]
            y[b, t] += D * u[b, t]
    return y


def test_recurrence_equals_the_closed_form():
    args = inputs(batch=1, length=7, channels=3, d_state=2)
    torch.testing.assert_close(selective_scan(*args, mode="recurrent"), hand_scan(*args), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(selective_scan(*args, chunk_size=3), hand_scan(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 32])  # divides 20 or not, larger than the length
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("d_state", [1, 3])  # a one-wide state is contracted after the pass, a wide one per step
def test_chunkwise_equals_recurrent_forward_and_gradients(chunk_size, groups, ordered, d_state):
    length = 20
    args = inputs(length=length, groups=groups, d_state=d_state, grad=True)
    order = None
    if ordered:
        gen = torch.Generator().manual_seed(7)
        order = torch.stack([torch.randperm(length, generator=gen) for _ in range(groups or 1)])
    reference = selective_scan(*args, order=order, mode="recurrent")
    chunked = selective_scan(*args, order=order, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-10)
    weights = rand64(*reference.shape, seed=11)
    grads_ref = torch.autograd.grad((reference * weights).sum(), args)
    grads = torch.autograd.grad((chunked * weights).sum(), args)
    for name, g, g_ref in zip(["u", "delta", "A", "B", "C", "D"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_order_is_a_token_permutation():
    """Scanning in order π equals permuting the inputs, scanning in 0..L−1, and un-permuting the outputs."""
    u, delta, A, B, C, D = inputs(length=11)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    y = selective_scan(u, delta, A, B, C, D, order=order, chunk_size=4)
    y_plain = selective_scan(u[:, order], delta[:, order], A, B[:, order], C[:, order], D, mode="recurrent")
    expected = torch.empty_like(y_plain)
    expected[:, order] = y_plain
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_groups_scan_independently_in_their_own_orders():
    u, delta, A, B, C, D = inputs(length=9, channels=4, groups=2)
    order = torch.stack([torch.arange(9), torch.arange(9).flip(0)])
    y = selective_scan(u, delta, A, B, C, D, order=order)
    for g, o in enumerate(order):
        part = slice(2 * g, 2 * g + 2)
        alone = selective_scan(u[..., part], delta[..., part], A[part], B[:, :, g], C[:, :, g], D[part], order=o)
        torch.testing.assert_close(y[..., part], alone, rtol=0, atol=1e-12)


def test_first_output_depends_only_on_the_first_token_of_the_order():
    u, delta, A, B, C, D = inputs(length=10)
    order = torch.arange(10).flip(0)
    u.requires_grad_()
    y = selective_scan(u, delta, A, B, C, D, order=order)
    (grad,) = torch.autograd.grad(y[:, 9].sum(), u)  # token 9 is scanned first
    assert grad[:, :9].abs().max() == 0 and grad[:, 9].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_uses_a_float32_state(dtype):
    args = inputs(length=40, seed=2)
    low = [t.to(dtype) for t in args]
    y = selective_scan(*low, chunk_size=8)
    assert y.dtype == dtype
    reference = selective_scan(*(t.to(dtype).double() for t in args), mode="recurrent")
    err = (y.double() - reference).abs().max() / reference.abs().max()
    assert err < 1e-2, f"relative error {err:.2e}"


def test_empty_inputs_give_empty_outputs():
    u, delta, A, B, C, D = inputs(length=0)
    assert selective_scan(u, delta, A, B, C, D).shape == u.shape
    u, delta, A, B, C, D = inputs(batch=0)
    assert selective_scan(u, delta, A, B, C, D, order=torch.arange(13)).shape == u.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "u": a["u"][0]}, "u.shape"),
        (lambda a: {**a, "delta": a["delta"][:, :5]}, "delta.shape"),
        (lambda a: {**a, "A": a["A"][:4]}, "A.shape"),
        (lambda a: {**a, "B": a["B"][:, :, :2]}, "B.shape"),
        (lambda a: {**a, "C": a["C"][:1]}, "C.shape"),
        (
            lambda a: {
                **a,
                "B": a["B"][:, :, None].expand(-1, -1, 4, -1),
                "C": a["C"][:, :, None].expand(-1, -1, 4, -1),
            },
            "divisible by the groups=4",
        ),
        (lambda a: {**a, "D": a["D"][:2]}, "D must be"),
        (lambda a: {**a, "order": torch.zeros(13, dtype=torch.long)}, "permutation"),
        (lambda a: {**a, "order": torch.arange(12)}, "order.shape"),
        (lambda a: {**a, "order": torch.arange(13.0)}, "integer tensor"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size=0"),
        (lambda a: {**a, "mode": "parallel"}, "mode='parallel'"),
    ],
)
def test_bad_arguments_raise_naming_them(change, message):
    u, delta, A, B, C, D = inputs()
    kwargs = change({"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D})
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")):
        selective_scan(**kwargs)


def test_integer_inputs_are_rejected():
    u, delta, A, B, C, D = inputs()
    with pytest.raises(TypeError, match="u.dtype"):
        selective_scan(u.long(), delta, A, B, C, D)


def test_compiles_and_exports_with_a_fixed_order():
    u, delta, A, B, C, D = (t.float() for t in inputs(length=12))
    order = torch.arange(12).flip(0)

    class Scan(torch.nn.Module):
        def forward(self, u, delta):
            return selective_scan(u, delta, A, B, C, D, order=order, chunk_size=5)

    expected = Scan()(u, delta)
    compiled = torch.compile(Scan(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(u, delta), expected)
    exported = torch.export.export(Scan(), (u, delta))
    torch.testing.assert_close(exported.module()(u, delta), expected)
