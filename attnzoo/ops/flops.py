"""Useful FLOPs of the engine's fused custom ops, registered with ``torch.utils.flop_counter``.

``FlopCounterMode`` cannot see inside ``attnzoo::na_forward`` (``na_forward_saving``)/``na_backward``; these formulas count the useful work:
the forward is the two matmuls QKᵀ and PV over each query's window (and the additional keys),
4·B·heads·N·(Πkernel + n_add)·d when d_qk = d_v; the backward twice that (dS = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K,
dK = dSᵀ·Q), as for dense attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from .backends import native as _native  # noqa: F401  (defines the attnzoo::na_* custom ops)

__all__ = ["na_forward_flops", "na_backward_flops"]


def _window_flops(q_shape, v_shape, kernel_size, additional_keys_shape) -> int:
    batch, heads, d_qk = q_shape[0], q_shape[-2], q_shape[-1]
    tokens = math.prod(q_shape[1:-2])
    keys = math.prod(kernel_size) + (0 if additional_keys_shape is None else additional_keys_shape[1])
    return 2 * batch * heads * tokens * keys * (d_qk + v_shape[-1])


@register_flop_formula([torch.ops.attnzoo.na_forward, torch.ops.attnzoo.na_forward_saving])
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
