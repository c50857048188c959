"""FLOP counting with ``torch.utils.flop_counter``, including the engine's fused custom ops.

Importing this module registers formulas for ``torch.ops.attnzoo.na_forward`` (4·B·heads·N·(Πkernel + n_add)·d,
the two matmuls QKᵀ and PV over each query's window and the additional keys) and ``na_backward`` (twice the
forward, as for dense attention), so ``FlopCounterMode`` sees the work done inside the native kernel. It also
registers the usual FFT estimate for ``aten._fft_{r2c,c2r,c2c}`` (5·n·log2 n per complex transform of n points, half
that for real ones), which ``torch.utils.flop_counter`` leaves uncounted, so spectral mixers are not free.
Like ``FlopCounterMode`` itself, elementwise ops and softmax are not counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from ..ops.backends import native as _native  # noqa: F401  (defines the attnzoo::na_* custom ops)

__all__ = ["count_flops", "na_forward_flops", "na_backward_flops", "fft_flops"]


def _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape) -> int:
    batch, heads, d_qk = q_shape[0], q_shape[-2], q_shape[-1]
    tokens = math.prod(q_shape[1:-2])
    keys = math.prod(kernel_size) + (0 if additional_keys_shape is None else additional_keys_shape[1])
    return 2 * batch * heads * tokens * keys * (d_qk + v_shape[-1])


@register_flop_formula(torch.ops.attnzoo.na_forward)
def na_forward_flops(
    q_shape, k_shape, v_shape, additional_keys_shape, additional_values_shape, rel_pos_bias_shape, key_bias_shape,
    kernel_size, *args: Any, out_shape=None, **kwargs: Any,
) -> int:  # fmt: skip
    """4·B·heads·N·(Πkernel + n_additional)·d (d_qk and d_v counted separately when they differ)."""
    return _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape)


@register_flop_formula(torch.ops.attnzoo.na_backward)
def na_backward_flops(
    grad_out_shape, grad_lse_shape, q_shape, k_shape, v_shape, additional_keys_shape, additional_values_shape,
    rel_pos_bias_shape, key_bias_shape, out_shape_, lse_shape, kernel_size, *args: Any, out_shape=None, **kwargs: Any,
) -> int:  # fmt: skip
    """Twice the forward: dS = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q."""
    return 2 * _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape)


def _fft(real_shape, dim, complex_transform: bool) -> int:
    n = math.prod(real_shape[d] for d in dim)
    if n <= 1:
        return 0
    batch = math.prod(real_shape) // n
    return int((5.0 if complex_transform else 2.5) * batch * n * math.log2(n))


@register_flop_formula(torch.ops.aten._fft_r2c)
def _fft_r2c_flops(self_shape, dim, normalization, onesided, out_shape=None, **kwargs: Any) -> int:
    return _fft(self_shape, dim, complex_transform=False)


@register_flop_formula(torch.ops.aten._fft_c2r)
def _fft_c2r_flops(self_shape, dim, normalization, last_dim_size, out_shape=None, **kwargs: Any) -> int:
    return _fft(out_shape, dim, complex_transform=False)


@register_flop_formula(torch.ops.aten._fft_c2c)
def _fft_c2c_flops(self_shape, dim, normalization, forward, out_shape=None, **kwargs: Any) -> int:
    return _fft(self_shape, dim, complex_transform=True)


def fft_flops(shape: tuple[int, ...], dim: tuple[int, ...], complex_transform: bool) -> int:
    """The estimate registered for FFTs over axes ``dim`` of a (real-side) tensor ``shape``."""
    return _fft(shape, dim, complex_transform)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs (multiply and add counted separately) of everything ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
