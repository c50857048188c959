"""FLOP counting: ``count_flops`` over ``torch.utils.flop_counter``, with formulas for what it cannot see.

``FlopCounterMode`` cannot see inside ``attnzoo::na_forward`` (``na_forward_saving``)/``na_backward``; these formulas count the useful work:
the forward is the two matmuls QKᵀ and PV over each query's window (and the additional keys),
4·B·heads·N·(Πkernel + n_add)·d when d_qk = d_v; the backward twice that (dS = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K,
dK = dSᵀ·Q), as for dense attention.

FFTs and CPU SDPA. This module also registers the usual FFT estimate for
``aten._fft_{r2c,c2r,c2c}`` (5·n·log2 n per complex transform of n points, half that for real ones), which
``torch.utils.flop_counter`` leaves uncounted, so spectral mixers are not free, and counts the CPU kernel of
``scaled_dot_product_attention`` (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which
``torch.utils.flop_counter`` has no formula for) with torch's own SDPA formulas, so dense attention on CPU is not free.
Like ``FlopCounterMode`` itself, elementwise ops and softmax are not counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .backends import native as _native  # noqa: F401  (defines the attnzoo::na_* custom ops)

__all__ = ["count_flops", "fft_flops", "na_forward_flops", "na_backward_flops"]


def _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape) -> int:
    batch, heads, d_qk = q_shape[0], q_shape[-2], q_shape[-1]
    tokens = math.prod(q_shape[1:-2])
    keys = math.prod(kernel_size) + (0 if additional_keys_shape is None else additional_keys_shape[1])
    return 2 * batch * heads * tokens * keys * (d_qk + v_shape[-1])


@register_flop_formula([torch.ops.attnzoo.na_forward, torch.ops.attnzoo.na_forward_saving])
def na_forward_flops(
    q_shape,
    k_shape,
    v_shape,
    additional_keys_shape,
    additional_values_shape,
    rel_pos_bias_shape,
    key_bias_shape,
    kernel_size,
    *args: Any,
    out_shape=None,
    **kwargs: Any,
) -> int:
    """4·B·heads·N·(Πkernel + n_additional)·d (d_qk and d_v counted separately when they differ)."""
    return _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape)


@register_flop_formula(torch.ops.attnzoo.na_backward)
def na_backward_flops(
    grad_out_shape,
    grad_lse_shape,
    q_shape,
    k_shape,
    v_shape,
    additional_keys_shape,
    additional_values_shape,
    rel_pos_bias_shape,
    key_bias_shape,
    out_shape_,
    lse_shape,
    kernel_size,
    *args: Any,
    out_shape=None,
    **kwargs: Any,
) -> int:
    """Twice the forward: dS = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q."""
    return 2 * _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape)


def fft_flops(shape: tuple[int, ...], dim: tuple[int, ...], complex_transform: bool) -> int:
    """The estimate registered for FFTs over axes ``dim`` of a (real-side) tensor ``shape``."""
    n = math.prod(shape[d] for d in dim)
    if n <= 1:
        return 0
    batch = math.prod(shape) // n
    return int((5.0 if complex_transform else 2.5) * batch * n * math.log2(n))


@register_flop_formula(torch.ops.aten._fft_r2c)
def _fft_r2c_flops(self_shape, dim, normalization, onesided, out_shape=None, **kwargs: Any) -> int:
    return fft_flops(self_shape, dim, complex_transform=False)


@register_flop_formula(torch.ops.aten._fft_c2r)
def _fft_c2r_flops(self_shape, dim, normalization, last_dim_size, out_shape=None, **kwargs: Any) -> int:
    return fft_flops(out_shape, dim, complex_transform=False)


@register_flop_formula(torch.ops.aten._fft_c2c)
def _fft_c2c_flops(self_shape, dim, normalization, forward, out_shape=None, **kwargs: Any) -> int:
    return fft_flops(self_shape, dim, complex_transform=True)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs (multiply and add counted separately) of everything ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
