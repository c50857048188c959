"""FLOP counting with ``torch.utils.flop_counter``, including the engine's fused custom ops.

The engine registers the formulas of its own fused ops when ``attnzoo.ops`` is imported (``attnzoo.ops.flops``:
``na_forward`` counts 4·B·heads·N·(Πkernel + n_add)·d, ``na_backward`` twice that), so ``FlopCounterMode`` sees the
work done inside the native kernel wherever it is used. This module adds the usual FFT estimate for
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
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "fft_flops"]


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
def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs (multiply and add counted separately) of everything ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
