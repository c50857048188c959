"""The checks behind ``make_problem``: one function per concern, each raising a named error before any heavy work.

Modelled on NATTEN's ``utils/checks.py``: the tensors' types, their layout and rank, agreement of q/k/v, then each
optional input (additional keys/values, relative-position bias, key bias). Every function only reads shapes, dtypes
and devices.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "check_tensors", "check_layout", "check_qkv_agree", "check_additional_kv", "check_rel_pos_bias", "check_key_bias",
    "any_requires_grad", "check_scale",
]  # fmt: skip


def check_scale(scale) -> None:
    """``scale`` is None or a real number (not a bool)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale={scale!r} must be a float or None")


def check_tensors(q, k, v) -> None:
    """q, k and v are tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_layout(q: torch.Tensor) -> int:
    """q is a floating ``[batch, *spatial, heads, head_dim]`` tensor with 1 to 3 spatial axes; returns their number."""
    rank = q.dim() - 3
    if rank not in (1, 2, 3):
        raise ValueError(
            f"q.shape={tuple(q.shape)} must be [batch, *spatial, heads, head_dim] with 1, 2 or 3 spatial axes "
            f"(3 to 6 dims), got {q.dim()} dims"
        )
    if not q.is_floating_point():
        raise TypeError(f"q.dtype={q.dtype} must be a floating-point dtype")
    return rank


def check_qkv_agree(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k and v share q's dtype, device and dims; k has q's shape, v differs at most in its last dim; none is empty."""
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


def check_additional_kv(q: torch.Tensor, v: torch.Tensor, additional_keys, additional_values) -> int:
    """Additional keys/values come together as ``[batch, n, heads, head_dim(_v)]`` tensors like q's; returns ``n``."""
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (both tensors or both None)")
    if additional_keys is None:
        return 0
    ak, av = additional_keys, additional_values
    if not isinstance(ak, torch.Tensor) or not isinstance(av, torch.Tensor):
        raise TypeError("additional_keys and additional_values must be torch.Tensors")
    b, h, d, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    if ak.dim() != 4 or tuple(ak.shape) != (b, ak.shape[1], h, d):
        raise ValueError(f"additional_keys.shape={tuple(ak.shape)} must be [batch={b}, n, heads={h}, head_dim={d}]")
    if tuple(av.shape) != (b, ak.shape[1], h, dv):
        raise ValueError(
            f"additional_values.shape={tuple(av.shape)} must be [batch={b}, n={ak.shape[1]}, heads={h}, "
            f"head_dim_v={dv}]"
        )
    for name, t in (("additional_keys", ak), ("additional_values", av)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} has dtype {t.dtype} on {t.device}; expected {q.dtype} on {q.device}")
    return int(ak.shape[1])


def check_rel_pos_bias(q: torch.Tensor, rel_pos_bias, kernel_size: Sequence[int]) -> None:
    """A relative-position bias (when given) is a ``[heads, *(2·kernel_size − 1)]`` tensor of q's dtype and device."""
    if rel_pos_bias is None:
        return
    expected = (q.shape[-2], *(2 * kk - 1 for kk in kernel_size))
    if not isinstance(rel_pos_bias, torch.Tensor) or tuple(rel_pos_bias.shape) != expected:
        got = tuple(rel_pos_bias.shape) if isinstance(rel_pos_bias, torch.Tensor) else type(rel_pos_bias).__name__
        raise ValueError(f"rel_pos_bias.shape={got} must be [heads, *(2*kernel_size-1)] = {expected}")
    if rel_pos_bias.dtype != q.dtype or rel_pos_bias.device != q.device:
        raise TypeError(
            f"rel_pos_bias has dtype {rel_pos_bias.dtype} on {rel_pos_bias.device}; expected {q.dtype} on {q.device}"
        )


def check_key_bias(q: torch.Tensor, key_bias, spatial_shape: Sequence[int]) -> None:
    """A key bias (when given) is a float tensor on q's device broadcasting to ``[batch, *spatial, heads]``."""
    if key_bias is None:
        return
    target = (q.shape[0], *spatial_shape, q.shape[-2])
    if not isinstance(key_bias, torch.Tensor) or not key_bias.is_floating_point():
        raise TypeError(f"key_bias must be a float tensor broadcastable to {target}, got {type(key_bias).__name__}")
    try:
        ok = key_bias.dim() <= len(target) and torch.broadcast_shapes(tuple(key_bias.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"key_bias.shape={tuple(key_bias.shape)} must broadcast to [batch, *spatial, heads]={target}")
    if key_bias.dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"key_bias.dtype={key_bias.dtype} must be q.dtype={q.dtype}, float32 or float64")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias.device={key_bias.device} must equal q.device={q.device}")


def any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd will differentiate the call: grad mode is on and one of the (optional) inputs requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
