"""Generalized neighborhood attention (NA, DiNA, GNA): one generic op and its 1-D/2-D/3-D wrappers.

Drop-in for ``natten.functional.na{1,2,3}d`` (NATTEN 0.21 semantics, see ``geometry``) on any device:
``q, k, v`` are ``[batch, *spatial, heads, head_dim]`` (``v`` may have another head_dim).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import recording
from .backends import BACKENDS, select_backend
from .problem import make_problem

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d"]


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    rel_pos_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to its (strided, dilated, optionally causal) window, clamped inside the canvas.

    Args:
        q, k: ``[B, *spatial, heads, head_dim]``; v: ``[B, *spatial, heads, head_dim_v]``; 1 to 3 spatial axes.
        kernel_size, stride, dilation, is_causal: one value or one per spatial axis.
            Rules: ``2 <= kernel_size``, ``kernel_size·dilation <= extent``, ``1 <= stride <= kernel_size``.
        scale: logit scale, ``head_dim ** -0.5`` when ``None``.
        additional_keys, additional_values: ``[B, n, heads, head_dim(_v)]`` tokens every query also attends to,
            in the same softmax (global tokens, registers, agents).
        return_lse: also return the logsumexp of the logits ``[B, *spatial, heads]`` (float32 for half inputs),
            for ``merge_attentions``.
        backend: ``"auto"`` or one of ``attnzoo.ops.list_backends()``; an explicit backend that cannot run the
            call raises with every reason instead of falling back.
        rel_pos_bias: optional ``[heads, *(2·kernel_size - 1)]`` table added to the logits, indexed by the
            key − query offset in dilation-group units (NAT's relative position bias).
        key_bias: optional float tensor broadcastable to ``[B, *spatial, heads]`` added to every logit of that key
            (``-inf`` drops the key, e.g. zero padding). Not applied to additional keys. A query whose keys are
            all dropped gets output 0 and lse ``-inf``.
    """
    problem = make_problem(
        q, k, v, kernel_size, stride, dilation, is_causal, additional_keys, additional_values, rel_pos_bias, return_lse,
        key_bias,
    )
    if scale is None:
        scale = problem.head_dim**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale={scale!r} must be a float or None")
    chosen = select_backend(backend, problem)
    if recording.is_recording():
        _record(q, k, v, problem, float(scale), additional_keys, additional_values, rel_pos_bias, key_bias)
    out, lse = chosen.run(
        q, k, v, problem, scale=float(scale), additional_keys=additional_keys, additional_values=additional_values,
        rel_pos_bias=rel_pos_bias, key_bias=key_bias,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _record(q, k, v, problem, scale, additional_keys, additional_values, rel_pos_bias, key_bias) -> None:
    """Dense weights of this call for ``record_attention``: the reference backend with one-hot values."""
    n, extra = problem.num_tokens, problem.num_additional
    recording.check_size(n, n + extra)
    with torch.no_grad():
        eye = torch.eye(n + extra, dtype=torch.float32, device=q.device)
        values = eye[:n].reshape(1, *problem.spatial_shape, 1, n + extra)
        values = values.expand(problem.batch, *problem.spatial_shape, problem.heads, n + extra)
        extra_values = None
        if additional_keys is not None:
            extra_values = eye[n:].reshape(1, extra, 1, n + extra).expand(problem.batch, extra, problem.heads, -1)
            additional_keys = additional_keys.float()
        weights, _ = BACKENDS["reference"].run(
            q.float(), k.float(), values, problem, scale=scale, additional_keys=additional_keys,
            additional_values=extra_values, rel_pos_bias=None if rel_pos_bias is None else rel_pos_bias.float(),
            key_bias=None if key_bias is None else key_bias.float(),
        )  # fmt: skip
        weights = weights.reshape(problem.batch, n, problem.heads, n + extra).transpose(1, 2)
        recording.add("neighborhood", weights, problem.spatial_shape, problem.spatial_shape, extra)


def _fixed_rank(rank: int):
    def wrapper(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
                additional_values=None, return_lse=False, backend="auto", rel_pos_bias=None, key_bias=None):  # fmt: skip
        if not isinstance(q, torch.Tensor) or q.dim() != rank + 3:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"na{rank}d expects q of shape [batch, {rank} spatial axes, heads, head_dim], got {shape}")
        return neighborhood_attention(
            q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values, return_lse,
            backend, rel_pos_bias, key_bias,
        )  # fmt: skip

    wrapper.__name__ = f"na{rank}d"
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = f"{rank}-D neighborhood attention; see ``neighborhood_attention`` for the arguments."
    return wrapper


na1d = _fixed_rank(1)
na2d = _fixed_rank(2)
na3d = _fixed_rank(3)
