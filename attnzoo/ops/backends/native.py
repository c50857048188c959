"""Fused CPU kernel: one pass per query over exactly its neighborhood, forward and backward.

Registered as ``torch.library`` custom ops (``attnzoo::na_forward`` / ``attnzoo::na_backward``) with fake
implementations and an autograd formula, so modules built on it work under ``torch.compile(fullgraph=True)`` and
``torch.export``; eager calls on real tensors skip that dispatch and run the same kernel functions under
``EagerNeighborhoodAttention`` (an ``autograd.Function``), or directly when no gradient is needed. Half-precision
inputs are computed in float32 and cast back. q, k and v are read in place when their spatial axes flatten to one
token stride (e.g. views of one fused qkv projection), not copied. A forward that needs a gradient runs
``attnzoo::na_forward_saving``, which also returns the window's softmax probabilities for the backward to read
instead of recomputing them, unless ``saves_probabilities`` says they would outnumber q, k and v's values (or
``ATTNZOO_SAVE_PROBABILITIES=0``).
"""

from __future__ import annotations

import ctypes
import math
import os
from functools import lru_cache
from typing import Optional

import torch

from ..geometry import axis_windows
from ..problem import NAProblem, make_problem
from . import _native_lib
from .base import Backend, compute_dtype, values_readable

_KERNEL_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


@lru_cache(maxsize=256)
def _geometry(shape: tuple, kernel: tuple, stride: tuple, dilation: tuple, causal: tuple):
    """Per-axis tables padded to 3 axes, kept alive together with the ctypes pointer array into them."""
    pad = 3 - len(shape)
    axes = [axis_windows(1, 1, 1, 1, False)] * pad + [
        axis_windows(*args) for args in zip(shape, kernel, stride, dilation, causal)
    ]
    tables = [t.contiguous() for a in axes for t in (a.start, a.count, a.rel_start)]
    pointers = (ctypes.c_void_p * 9)(*(t.data_ptr() for t in tables))
    meta = torch.tensor(
        [[a.extent for a in axes], [a.dilation for a in axes], [2 * a.kernel_size - 1 for a in axes]], dtype=torch.int64
    )
    return tables, pointers, meta


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def kernel_readable(t: torch.Tensor) -> bool:
    """True when the kernel can read ``t`` [batch, *spatial, heads, d] in place: unit stride along d (or d = 1) and
    spatial axes that flatten to one token stride (contiguous tensors, views of a fused qkv projection)."""
    if t.shape[-1] != 1 and t.stride(-1) != 1:
        return False
    spatial = range(1, t.dim() - 2)
    return all(t.shape[i + 1] == 1 or t.stride(i) == t.stride(i + 1) * t.shape[i + 1] for i in spatial[:-1])


def _layout(*tensors: torch.Tensor) -> torch.Tensor:
    """Batch, token and head strides of q, k and v (in elements) for the kernel."""
    return torch.tensor([s for t in tensors for s in (t.stride(0), t.stride(-3), t.stride(-2))], dtype=torch.int64)


def saves_probabilities(problem: NAProblem, head_dim: int, value_dim: int) -> bool:
    """Whether a forward that needs a gradient keeps its softmax probabilities for the backward instead of the
    backward recomputing them. Never when the Πkernel_size of them per query and head outnumber what q, k and v hold
    (2·head_dim + value_dim); otherwise yes, unless ``ATTNZOO_SAVE_PROBABILITIES=0`` (``1`` is the default).
    Measured on 2 Xeon cores with the allocator held steady (interleaved A/B of forward+backward): saving is
    1.03-1.10× faster on lane-tiled maps (workload P 1.075 / 1.037 with 2 / 1 threads; dilation 2, kernel 9, 28² and
    14² maps, 1-D kernel 31), at parity on 3-D (0.996-1.018) and on NAT-T training (0.995). An earlier rule recomputed
    on lane-tiled maps, measured before the benchmarks held the allocator steady, when the saved tensor's fresh pages
    were paid on every call."""
    if math.prod(problem.kernel_size) > 2 * head_dim + value_dim:
        return False
    forced = os.environ.get("ATTNZOO_SAVE_PROBABILITIES", "1")
    if forced not in ("0", "1"):
        raise ValueError(f"ATTNZOO_SAVE_PROBABILITIES={forced!r} must be '0' (recompute) or '1' (save, the default)")
    return forced == "1"


def _check_op_inputs(
    op: str,
    q,
    k,
    v,
    additional_keys,
    additional_values,
    rel_pos_bias,
    key_bias,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
) -> NAProblem:
    """The registered ops are reachable by anyone as ``torch.ops.attnzoo.*``: check everything the C kernel trusts
    (shapes, dtypes, devices, contiguity, window geometry) before it reads a byte, in O(number of arguments)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attnzoo::{op}: {name} must be a tensor, got {type(t).__name__}")
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"attnzoo::{op}: q.dtype={q.dtype} must be float32 or float64")
    if key_bias is not None and isinstance(key_bias, torch.Tensor) and key_bias.dtype != q.dtype:
        raise TypeError(f"attnzoo::{op}: key_bias.dtype={key_bias.dtype} must equal q.dtype={q.dtype}")
    rank = q.dim() - 3
    if rank not in (1, 2, 3):
        raise ValueError(
            f"attnzoo::{op}: q.shape={tuple(q.shape)} must be [batch, *spatial (1 to 3 axes), heads, head_dim]"
        )
    for name, value in (
        ("kernel_size", kernel_size),
        ("stride", stride),
        ("dilation", dilation),
        ("is_causal", is_causal),
    ):
        if not isinstance(value, (list, tuple)) or len(value) != rank:
            raise ValueError(f"attnzoo::{op}: {name}={value!r} must be a list with one entry per spatial axis ({rank})")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attnzoo::{op}: scale={scale!r} must be a float")
    try:
        problem = make_problem(
            q,
            k,
            v,
            list(kernel_size),
            list(stride),
            list(dilation),
            list(is_causal),
            additional_keys,
            additional_values,
            rel_pos_bias,
            False,
            key_bias,
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"attnzoo::{op}: {exc}") from None
    if q.device.type != "cpu":
        raise ValueError(f"attnzoo::{op}: runs on CPU tensors only, got device {q.device}")
    if key_bias is not None and tuple(key_bias.shape) != (problem.batch, *problem.spatial_shape, problem.heads):
        raise ValueError(f"attnzoo::{op}: key_bias.shape={tuple(key_bias.shape)} must be [batch, *spatial, heads]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not kernel_readable(t):
            raise ValueError(
                f"attnzoo::{op}: {name} (strides {t.stride()}) must be contiguous, or have unit stride along its last "
                "axis and spatial axes that flatten to one token stride"
            )
    for name, t in (
        ("additional_keys", additional_keys),
        ("additional_values", additional_values),
        ("rel_pos_bias", rel_pos_bias),
        ("key_bias", key_bias),
    ):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"attnzoo::{op}: {name} must be contiguous")
    return problem


def _check_same(op: str, name: str, t, shape: tuple, problem: NAProblem) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"attnzoo::{op}: {name}.shape={got} must be {tuple(shape)}")
    if t.dtype != problem.dtype or t.device != problem.device or not t.is_contiguous():
        raise ValueError(f"attnzoo::{op}: {name} must be a contiguous {problem.dtype} tensor on {problem.device}")


def _call(name: str, dtype: torch.dtype):
    return getattr(_native_lib.load(), f"attnzoo_na_{name}_{_KERNEL_DTYPES[dtype]}")


def _forward(
    op: str,
    q,
    k,
    v,
    additional_keys,
    additional_values,
    rel_pos_bias,
    key_bias,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
    save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_inputs(
        op, q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride, dilation,
        is_causal, scale,
    )  # fmt: skip
    return kernel_forward(
        q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride, dilation, is_causal,
        scale, save_probs,
    )  # fmt: skip


def kernel_forward(
    q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride, dilation, is_causal,
    scale: float, save_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The C kernel's forward on inputs already checked (by ``_check_op_inputs``, or by ``make_problem`` and
    ``NativeBackend.run``): out, lse and the saved probabilities (an empty tensor unless ``save_probs``)."""
    shape = tuple(q.shape[1:-2])
    _, pointers, meta = _geometry(shape, tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1])
    probs = q.new_empty(_probs_shape(q, kernel_size) if save_probs else (0,))
    na = 0 if additional_keys is None else additional_keys.shape[1]
    strides = _layout(q, k, v)
    _call("forward", q.dtype)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(additional_keys), _ptr(additional_values), _ptr(rel_pos_bias),
        _ptr(key_bias), out.data_ptr(), lse.data_ptr(), probs.data_ptr() if save_probs else None, meta[0].data_ptr(),
        meta[1].data_ptr(), meta[2].data_ptr(), pointers, strides.data_ptr(),
        q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1], na, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out, lse, probs


def _probs_shape(q: torch.Tensor, kernel_size) -> tuple[int, ...]:
    """Saved probabilities: [batch, heads, tokens, Πkernel_size]."""
    return (q.shape[0], q.shape[-2], math.prod(q.shape[1:-2]), math.prod(kernel_size))


@torch.library.custom_op("attnzoo::na_forward", mutates_args=())
def na_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additional_keys: Optional[torch.Tensor],
    additional_values: Optional[torch.Tensor],
    rel_pos_bias: Optional[torch.Tensor],
    key_bias: Optional[torch.Tensor],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = _forward(
        "na_forward",
        q,
        k,
        v,
        additional_keys,
        additional_values,
        rel_pos_bias,
        key_bias,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        save_probs=False,
    )
    return out, lse


@na_forward.register_fake
def _(
    q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride, dilation, is_causal, scale
):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1])


@torch.library.custom_op("attnzoo::na_forward_saving", mutates_args=())
def na_forward_saving(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additional_keys: Optional[torch.Tensor],
    additional_values: Optional[torch.Tensor],
    rel_pos_bias: Optional[torch.Tensor],
    key_bias: Optional[torch.Tensor],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``na_forward`` that also returns the softmax probabilities of every query's window keys, [batch, heads,
    tokens, Πkernel_size] (zero for keys outside a shrunk causal window), for the backward."""
    return _forward(
        "na_forward_saving", q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride,
        dilation, is_causal, scale, save_probs=True,
    )  # fmt: skip


@na_forward_saving.register_fake
def _(
    q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, kernel_size, stride, dilation, is_causal, scale
):
    return (
        q.new_empty((*q.shape[:-1], v.shape[-1])),
        q.new_empty(q.shape[:-1]),
        q.new_empty(_probs_shape(q, kernel_size)),
    )


@torch.library.custom_op("attnzoo::na_backward", mutates_args=())
def na_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additional_keys: Optional[torch.Tensor],
    additional_values: Optional[torch.Tensor],
    rel_pos_bias: Optional[torch.Tensor],
    key_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
    probs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _check_op_inputs(
        "na_backward",
        q,
        k,
        v,
        additional_keys,
        additional_values,
        rel_pos_bias,
        key_bias,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
    )
    _check_same("na_backward", "grad_out", grad_out, v.shape, problem)
    _check_same("na_backward", "out", out, v.shape, problem)
    _check_same("na_backward", "lse", lse, q.shape[:-1], problem)
    if grad_lse is not None:
        _check_same("na_backward", "grad_lse", grad_lse, q.shape[:-1], problem)
    if probs is not None:
        _check_same("na_backward", "probs", probs, _probs_shape(q, kernel_size), problem)
    return kernel_backward(
        grad_out, grad_lse, q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, out, lse,
        kernel_size, stride, dilation, is_causal, scale, probs=probs,
    )  # fmt: skip


def kernel_backward(
    grad_out, grad_lse, q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, out, lse, kernel_size,
    stride, dilation, is_causal, scale: float, probs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The C kernel's backward on inputs already checked: dq, dk, dv and the gradients of the optional inputs (empty
    tensors where absent)."""
    shape = tuple(q.shape[1:-2])
    _, pointers, meta = _geometry(shape, tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))
    # dq, dk and dv are written in full by the kernel; the additional-key and bias gradients are accumulated.
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
    has_add = additional_keys is not None
    dak = torch.zeros_like(additional_keys) if has_add else q.new_empty(0)
    dav = torch.zeros_like(additional_values) if has_add else q.new_empty(0)
    drpb = q.new_zeros((q.shape[0], *rel_pos_bias.shape)) if rel_pos_bias is not None else q.new_empty(0)
    dkb = torch.zeros_like(key_bias) if key_bias is not None else q.new_empty(0)
    na = additional_keys.shape[1] if has_add else 0
    strides = _layout(q, k, v)
    _call("backward", q.dtype)(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        _ptr(additional_keys),
        _ptr(additional_values),
        _ptr(rel_pos_bias),
        _ptr(key_bias),
        out.data_ptr(),
        lse.data_ptr(),
        _ptr(probs),
        grad_out.data_ptr(),
        _ptr(grad_lse),
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
        dak.data_ptr() if has_add else None,
        dav.data_ptr() if has_add else None,
        drpb.data_ptr() if rel_pos_bias is not None else None,
        dkb.data_ptr() if key_bias is not None else None,
        meta[0].data_ptr(),
        meta[1].data_ptr(),
        meta[2].data_ptr(),
        pointers,
        strides.data_ptr(),
        q.shape[0],
        q.shape[-2],
        q.shape[-1],
        v.shape[-1],
        na,
        scale,
        torch.get_num_threads(),
    )
    drpb = drpb.sum(0) if rel_pos_bias is not None else drpb
    return dq, dk, dv, dak, dav, drpb, dkb


@na_backward.register_fake
def _(
    grad_out, grad_lse, q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias, out, lse, *args, **kwargs
):
    has_add = additional_keys is not None
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        torch.empty_like(additional_keys) if has_add else q.new_empty(0),
        torch.empty_like(additional_values) if has_add else q.new_empty(0),
        torch.empty_like(rel_pos_bias) if rel_pos_bias is not None else q.new_empty(0),
        torch.empty_like(key_bias) if key_bias is not None else q.new_empty(0),
    )


def _keep_for_backward(ctx, inputs: tuple, out, lse, probs: Optional[torch.Tensor]) -> None:
    """What ``_gradients`` reads: the 7 tensor inputs, out, lse and (when saved) the probabilities; the geometry."""
    *tensors, kernel_size, stride, dilation, is_causal, scale = inputs
    ctx.save_for_backward(*tensors, out, lse, *([] if probs is None else [probs]))
    ctx.geometry = (kernel_size, stride, dilation, is_causal, scale)


def _setup_context(ctx, inputs, output):
    out, lse, *saved_probs = output  # na_forward_saving also returns the probabilities
    _keep_for_backward(ctx, inputs, out, lse, saved_probs[0] if saved_probs else None)


def _differentiable_backward(ctx, grad_out, grad_lse):
    """Gradients that are themselves differentiable (``create_graph=True``, e.g. a gradient penalty): the C kernel's
    backward is not, so the forward is recomputed with the ``tiled`` backend (same function, plain PyTorch) and
    differentiated by autograd. Slower than the fused backward; used only for higher-order gradients."""
    from .tiled import TiledBackend

    q, k, v, ak, av, rpb, kb = ctx.saved_tensors[:7]
    kernel_size, stride, dilation, is_causal, scale = ctx.geometry
    inputs = [q, k, v, ak, av, rpb, kb]
    leaves = [None if t is None else (t if t.requires_grad else t.detach().requires_grad_()) for t in inputs]
    q, k, v, ak, av, rpb, kb = leaves
    problem = make_problem(q, k, v, kernel_size, stride, dilation, is_causal, ak, av, rpb, True, kb)
    out, lse = TiledBackend().run(
        q, k, v, problem, scale=scale, additional_keys=ak, additional_values=av, rel_pos_bias=rpb, key_bias=kb
    )
    outputs, grads = [out], [grad_out if grad_out is not None else torch.zeros_like(out)]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    wanted = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(None if t is None else next(found) for t in leaves)


def _gradients(ctx, grad_out, grad_lse, eager: bool) -> tuple:
    """dq, dk, dv and the optional inputs' gradients (None where absent) from what the forward saved: through the
    registered ``attnzoo::na_backward`` (traceable), or straight into the kernel when ``eager``."""
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient must itself be differentiable
        return _differentiable_backward(ctx, grad_out, grad_lse)
    q, k, v, ak, av, rpb, kb, out, lse, *saved_probs = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dak, dav, drpb, dkb = (kernel_backward if eager else na_backward)(
        grad_out.contiguous(),
        None if grad_lse is None else grad_lse.contiguous(),
        q,
        k,
        v,
        ak,
        av,
        rpb,
        kb,
        out,
        lse,
        *ctx.geometry,
        probs=saved_probs[0] if saved_probs else None,
    )
    present = lambda grad, t: None if t is None else grad  # noqa: E731
    return dq, dk, dv, present(dak, ak), present(dav, av), present(drpb, rpb), present(dkb, kb)


def _backward(ctx, grad_out, grad_lse, grad_probs=None):
    return (*_gradients(ctx, grad_out, grad_lse, eager=False), None, None, None, None, None)


na_forward.register_autograd(_backward, setup_context=_setup_context)
na_forward_saving.register_autograd(_backward, setup_context=_setup_context)


class EagerNeighborhoodAttention(torch.autograd.Function):
    """The kernel under autograd outside tracing: the same forward, saved tensors and backward as the registered
    ops, without the ``torch.library`` dispatch around each of them: a training step of workload P 1.03× (1 thread,
    13.6 ms) and 1.04× (2 threads, 7.6 ms) faster in an interleaved A/B. The checks ``make_problem`` made at the
    library's entry still apply; ``_check_op_inputs`` guards the registered ops, which anyone can call."""

    @staticmethod
    def forward(ctx, *inputs_and_save):
        *inputs, save_probs = inputs_and_save  # the registered ops' 12 inputs, then whether to keep the probabilities
        out, lse, probs = kernel_forward(*inputs, save_probs)
        ctx.set_materialize_grads(False)
        _keep_for_backward(ctx, tuple(inputs), out, lse, probs if save_probs else None)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return (*_gradients(ctx, grad_out, grad_lse, eager=True), None, None, None, None, None, None)


class NativeBackend(Backend):
    name = "native"
    description = "fused C++ CPU kernel (JIT-built with the system compiler), forward and backward, autograd"

    def not_supported_reasons(self, problem: NAProblem) -> list[str]:
        reasons = []
        if problem.device.type != "cpu":
            reasons.append(f"runs on CPU tensors only, got device {problem.device}")
        why = _native_lib.unavailable_reason()
        if why is not None:
            reasons.append(f"kernel unavailable: {why}")
        return reasons

    def run(self, q, k, v, problem: NAProblem, *, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
        ct = compute_dtype(q.dtype)
        prep = lambda t: None if t is None else t.to(ct).contiguous()  # noqa: E731
        readable = lambda t: t if t.dtype == ct and kernel_readable(t) else prep(t)  # noqa: E731
        if key_bias is not None:
            key_bias = key_bias.expand(problem.batch, *problem.spatial_shape, problem.heads)
        save = problem.requires_grad and saves_probabilities(problem, q.shape[-1], v.shape[-1])
        args = (
            readable(q),
            readable(k),
            readable(v),
            prep(additional_keys),
            prep(additional_values),
            prep(rel_pos_bias),
            prep(key_bias),
            list(problem.kernel_size),
            list(problem.stride),
            list(problem.dilation),
            list(problem.is_causal),
            scale,
        )
        if not _eager(q):  # traced, fake, functorch-wrapped, or under a mode that watches ops: the registered ops
            out, lse, *_ = (na_forward_saving if save else na_forward)(*args)
        elif problem.requires_grad:
            out, lse = EagerNeighborhoodAttention.apply(*args, save)
        else:
            out, lse, _ = kernel_forward(*args, save_probs=False)
        return out.to(q.dtype), lse


def _eager(q: torch.Tensor) -> bool:
    """Whether the call runs eagerly on real data with no torch function or dispatch mode watching (e.g.
    ``FlopCounterMode``, which counts the registered ops), so that the kernel may be called without the ops."""
    if not values_readable(q):  # first: under torch.compile it is False, and dynamo cannot trace the checks below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(q)
