"""Argument normalisation for neighborhood attention: every bad input is rejected here, before any heavy work."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .checks import (
    any_requires_grad,
    check_additional_kv,
    check_key_bias,
    check_layout,
    check_qkv_agree,
    check_rel_pos_bias,
    check_tensors,
)  # fmt: skip

__all__ = [
    "NAProblem",
    "normalize_axis_arg",
    "normalize_window",
    "normalize_spatial_shape",
    "check_flag",
    "make_problem",
]

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


def check_flag(name: str, value) -> bool:
    """``value`` if it is a real bool (not a string, number or tensor), else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool, got {type(value).__name__}")
    return value


def normalize_spatial_shape(spatial_shape) -> tuple[int, ...]:
    """A spatial shape as a tuple of 1 to 3 positive ints (``torch.Size`` accepted; strings and floats are not)."""
    if not isinstance(spatial_shape, (tuple, list, torch.Size)):
        raise TypeError(f"spatial_shape={spatial_shape!r} must be a tuple of ints, got {type(spatial_shape).__name__}")
    if not 1 <= len(spatial_shape) <= 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in spatial_shape
    ):
        raise TypeError(f"spatial_shape={spatial_shape!r} must be a tuple of 1 to 3 ints")
    if min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape={spatial_shape!r} must have positive extents")
    return tuple(spatial_shape)


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
            rule = (
                f"kernel_size={kk} with dilation={dd} needs an extent >= {kk * dd}"
                if dd > 1
                else (f"kernel_size={kk} needs an extent >= {kk}")
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
    """Validate q/k/v and the window arguments (cheap checks only, one per concern: ``attnzoo.ops.checks``) and
    describe the call."""
    check_flag("return_lse", return_lse)
    check_tensors(q, k, v)
    rank = check_layout(q)
    check_qkv_agree(q, k, v)
    spatial = tuple(int(s) for s in q.shape[1 : 1 + rank])
    kernel, strides, dilations, causal = normalize_window(spatial, kernel_size, stride, dilation, is_causal)
    num_additional = check_additional_kv(q, v, additional_keys, additional_values)
    check_rel_pos_bias(q, rel_pos_bias, kernel)
    check_key_bias(q, key_bias, spatial)
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
        requires_grad=any_requires_grad(q, k, v, additional_keys, additional_values, rel_pos_bias, key_bias),
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
