"""Argument normalisation for neighborhood attention: every bad input is rejected here, before any heavy work."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["NAProblem", "normalize_axis_arg", "normalize_window", "make_problem"]

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def normalize_axis_arg(name: str, value, rank: int, *, kind: type = int, minimum: int | None = None) -> tuple:
    """Turn an int/bool or a per-axis sequence into a tuple of length ``rank``, or raise naming the argument."""
    if kind is bool:
        ok = lambda v: isinstance(v, bool)  # noqa: E731
        expected = "a bool or a sequence of bools"
    else:
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        expected = "an int or a sequence of ints"
    if ok(value):
        values = (value,) * rank
    elif isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name}={value!r} has {len(value)} entries but the input has {rank} spatial axes")
        if not all(ok(v) for v in value):
            raise TypeError(f"{name}={value!r} must be {expected}")
        values = tuple(value)
    else:
        raise TypeError(f"{name}={value!r} must be {expected}, got {type(value).__name__}")
    if minimum is not None:
        for axis, v in enumerate(values):
            if v < minimum:
                raise ValueError(f"{name}={value!r} must be >= {minimum} along every axis, got {v} along axis {axis}")
    return values


def normalize_window(
    spatial_shape: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    dilation: IntOrTuple,
    is_causal: BoolOrTuple,
    *,
    min_kernel_size: int = 2,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Per-axis ``(kernel_size, stride, dilation, is_causal)`` checked against the extents, or a named error."""
    rank = len(spatial_shape)
    kernel = normalize_axis_arg("kernel_size", kernel_size, rank, minimum=min_kernel_size)
    strides = normalize_axis_arg("stride", stride, rank, minimum=1)
    dilations = normalize_axis_arg("dilation", dilation, rank, minimum=1)
    causal = normalize_axis_arg("is_causal", is_causal, rank, kind=bool)
    for axis, (extent, kk, st, dd) in enumerate(zip(spatial_shape, kernel, strides, dilations)):
        if kk * dd > extent:
            rule = f"kernel_size={kk} with dilation={dd} needs an extent >= {kk * dd}" if dd > 1 else (
                f"kernel_size={kk} needs an extent >= {kk}"
            )
            raise ValueError(f"{rule} along axis {axis}, got {extent} (spatial shape {tuple(spatial_shape)})")
        if st > kk:
            raise ValueError(f"stride={st} must be <= kernel_size={kk} along axis {axis}")
    return kernel, strides, dilations, causal


@dataclass(frozen=True)
class NAProblem:
    """Everything a backend needs to decide whether it can run a neighborhood-attention call."""

    batch: int
    spatial_shape: tuple[int, ...]
    heads: int
    head_dim: int
    head_dim_v: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    dtype: torch.dtype
    device: torch.device
    num_additional: int = 0
    has_rel_pos_bias: bool = False
    return_lse: bool = False
    has_key_bias: bool = False
    requires_grad: bool = False  # autograd will differentiate the call (grad mode on, an input requires grad)

    @property
    def rank(self) -> int:
        return len(self.spatial_shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial_shape)


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    return_lse: bool = False,
    key_bias: torch.Tensor | None = None,
) -> NAProblem:
    """Validate q/k/v and the window arguments (cheap checks only) and describe the call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rank = q.dim() - 3
    if rank not in (1, 2, 3):
        raise ValueError(
            f"q.shape={tuple(q.shape)} must be [batch, *spatial, heads, head_dim] with 1, 2 or 3 spatial axes "
            f"(3 to 6 dims), got {q.dim()} dims"
        )
    if not q.is_floating_point():
        raise TypeError(f"q.dtype={q.dtype} must be a floating-point dtype")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={t.dtype} must equal q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")
        if t.dim() != q.dim():
            raise ValueError(f"{name}.shape={tuple(t.shape)} must have as many dims as q.shape={tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} must equal q.shape={tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v.shape={tuple(v.shape)} must equal q.shape={tuple(q.shape)} in every dim but the last (head_dim_v)"
        )
    if min(q.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)} must not have empty dims")
    spatial = tuple(int(s) for s in q.shape[1 : 1 + rank])
    kernel, strides, dilations, causal = normalize_window(spatial, kernel_size, stride, dilation, is_causal)

    num_additional = 0
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (both tensors or both None)")
    if additional_keys is not None:
        ak, av = additional_keys, additional_values
        if not isinstance(ak, torch.Tensor) or not isinstance(av, torch.Tensor):
            raise TypeError("additional_keys and additional_values must be torch.Tensors")
        b, h, d, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
        if ak.dim() != 4 or tuple(ak.shape) != (b, ak.shape[1], h, d):
            raise ValueError(
                f"additional_keys.shape={tuple(ak.shape)} must be [batch={b}, n, heads={h}, head_dim={d}]"
            )
        if tuple(av.shape) != (b, ak.shape[1], h, dv):
            raise ValueError(
                f"additional_values.shape={tuple(av.shape)} must be [batch={b}, n={ak.shape[1]}, heads={h}, "
                f"head_dim_v={dv}]"
            )
        for name, t in (("additional_keys", ak), ("additional_values", av)):
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} has dtype {t.dtype} on {t.device}; expected {q.dtype} on {q.device}")
        num_additional = int(ak.shape[1])

    if rel_pos_bias is not None:
        expected = (q.shape[-2], *(2 * kk - 1 for kk in kernel))
        if not isinstance(rel_pos_bias, torch.Tensor) or tuple(rel_pos_bias.shape) != expected:
            got = tuple(rel_pos_bias.shape) if isinstance(rel_pos_bias, torch.Tensor) else type(rel_pos_bias).__name__
            raise ValueError(f"rel_pos_bias.shape={got} must be [heads, *(2*kernel_size-1)] = {expected}")
        if rel_pos_bias.dtype != q.dtype or rel_pos_bias.device != q.device:
            raise TypeError(
                f"rel_pos_bias has dtype {rel_pos_bias.dtype} on {rel_pos_bias.device}; expected {q.dtype} on {q.device}"
            )

    if key_bias is not None:
        target = (q.shape[0], *spatial, q.shape[-2])
        if not isinstance(key_bias, torch.Tensor) or not key_bias.is_floating_point():
            raise TypeError(f"key_bias must be a float tensor broadcastable to {target}, got {type(key_bias).__name__}")
        try:
            ok = key_bias.dim() <= len(target) and torch.broadcast_shapes(tuple(key_bias.shape), target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"key_bias.shape={tuple(key_bias.shape)} must broadcast to [batch, *spatial, heads]={target}")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias.device={key_bias.device} must equal q.device={q.device}")

    return NAProblem(
        batch=int(q.shape[0]),
        spatial_shape=spatial,
        heads=int(q.shape[-2]),
        head_dim=int(q.shape[-1]),
        head_dim_v=int(v.shape[-1]),
        kernel_size=kernel,
        stride=strides,
        dilation=dilations,
        is_causal=causal,
        dtype=q.dtype,
        device=q.device,
        num_additional=num_additional,
        has_rel_pos_bias=rel_pos_bias is not None,
        return_lse=return_lse,
        has_key_bias=key_bias is not None,
        requires_grad=torch.is_grad_enabled()
        and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias)
        ),
    )


def normalize_head_groups(head_groups, heads: int) -> tuple[int, ...]:
    """``head_groups`` (sizes of consecutive head groups) as a tuple of positive ints summing to ``heads``."""
    if not isinstance(head_groups, (tuple, list)) or not head_groups:
        raise TypeError(f"head_groups={head_groups!r} must be a non-empty sequence of positive ints")
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in head_groups):
        raise ValueError(f"head_groups={head_groups!r} must contain positive ints")
    if sum(head_groups) != heads:
        raise ValueError(f"head_groups={head_groups!r} must sum to the number of heads {heads}, got {sum(head_groups)}")
    return tuple(head_groups)


def per_group_arg(name: str, value, num_groups: int) -> tuple:
    """A window argument given per head group: a plain int is shared by every group, otherwise a sequence with one
    entry (an int or a per-axis sequence) per group."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * num_groups
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name}={value!r} must be an int or a sequence with one entry per head group")
    if len(value) != num_groups:
        raise ValueError(f"{name}={value!r} must have one entry per head group ({num_groups} groups), got {len(value)}")
    return tuple(value)
