"""Delegation to NATTEN (``natten.functional.na{1,2,3}d``, Hassani et al., *Neighborhood Attention Transformer*,
2023; *Faster Neighborhood Attention*, 2024; *Generalized Neighborhood Attention*, 2025) when it is installed and
the call fits its features.

NATTEN 0.21 has the same window semantics as the engine (``geometry``) and takes additional keys/values and
``return_lse``, but no relative position bias and no per-key bias. Which of its kernels can run a call (Blackwell,
Hopper or CUTLASS FNA on CUDA, its Flex path elsewhere) is asked from NATTEN's own checks, on zero-stride stand-in
tensors of the call's shape, dtype and device. On CUDA only its fused FNA kernels are accepted: a NATTEN built
without ``libnatten`` falls back to unfused FlexAttention, and the engine's ``flex`` backend is the better choice.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from functools import lru_cache

import torch

from ..problem import NAProblem
from .base import Backend

# NATTEN's capability checks, in the order of its own backend choice (natten.backends.choose_backend)
_FUSED_CHECKS = ("can_run_cutlass_blackwell_fna", "can_run_cutlass_hopper_fna", "can_run_cutlass_fna")
_FLEX_CHECK = "can_run_flex_attention"


@lru_cache(maxsize=1)
def _natten():
    """``(natten.functional, natten.backends)`` or the reason it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("natten.functional"), importlib.import_module("natten.backends")
    except Exception as error:  # ImportError, or a natten built against another torch failing to load
        return f"natten is not importable ({type(error).__name__}: {error}); pip install natten"


def _quiet(fn, *args, **kwargs):
    """Call into NATTEN with its warnings and log messages silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        finally:
            logging.disable(previous)


@lru_cache(maxsize=256)
def _kernel_reasons(
    shape: tuple,
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    device: str,
    requires_grad: bool,
    deterministic: bool,
) -> tuple[str, ...]:
    """Why none of NATTEN's kernels takes tensors of this shape/dtype/device (empty when one does)."""
    _, backends = _natten()
    try:
        q, v = (
            torch.empty_strided((*shape, last), (0,) * (len(shape) + 1), dtype=dtype, device=device)
            for last in (head_dim, head_dim_v)
        )
    except RuntimeError as error:  # e.g. a CUDA problem on a machine without a usable GPU
        return (f"cannot allocate on {device}: {error}",)
    q.requires_grad_(requires_grad)
    v.requires_grad_(requires_grad)
    names = _FUSED_CHECKS if torch.device(device).type == "cuda" else (_FLEX_CHECK,)
    reasons = []
    for name in names:
        check = getattr(backends, name, None)
        if check is None:
            reasons.append(f"{name} is missing from this natten version")
            continue
        kwargs = {"torch_compile": False} if name == _FLEX_CHECK else {}
        try:
            if _quiet(check, q, q, v, raise_error=True, **kwargs):
                return ()
            reasons.append(f"{name} declined")
        except Exception as error:  # natten raises its reason (RuntimeError, ValueError, NotImplementedError)
            reasons.append(f"{name.removeprefix('can_run_')}: {error}")
    return tuple(reasons)


class NattenBackend(Backend):
    name = "natten"
    description = "natten.functional.na{1,2,3}d (fused FNA kernels on CUDA, its Flex path on CPU) when installed"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        p = problem
        loaded = _natten()
        if isinstance(loaded, str):
            return [loaded]
        reasons = []
        if p.has_rel_pos_bias:
            reasons.append("no rel_pos_bias in natten 0.21")
        if p.has_key_bias:
            reasons.append("no key_bias in natten 0.21")
        if torch.compiler.is_compiling():
            reasons.append("inside torch.compile: natten's Python front-end is called eagerly only")
        if p.device.type == "cpu" and p.requires_grad:
            reasons.append("no backward on CPU: natten runs torch's forward-only CPU FlexAttention there")
        kernel = _kernel_reasons(
            (p.batch, *p.spatial_shape, p.heads),
            p.head_dim,
            p.head_dim_v,
            p.dtype,
            str(p.device),
            p.requires_grad,
            torch.are_deterministic_algorithms_enabled(),
        )
        if kernel:
            reasons.append("natten has no kernel for this call (" + "; ".join(kernel) + ")")
        return reasons

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        functional, _ = _natten()
        p = problem
        fn = getattr(functional, f"na{p.rank}d")
        result = _quiet(
            fn,
            q,
            k,
            v,
            kernel_size=p.kernel_size,
            stride=p.stride,
            dilation=p.dilation,
            is_causal=p.is_causal,
            scale=scale,
            additional_keys=additional_keys,
            additional_values=additional_values,
            return_lse=p.return_lse,
        )
        out, lse = result if p.return_lse else (result, None)
        return out, (None if lse is None else lse.float())
