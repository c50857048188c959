"""Generalized neighborhood attention (NA, DiNA, GNA): one generic op and its 1-D/2-D/3-D wrappers.

Drop-in for ``natten.functional.na{1,2,3}d`` (NATTEN 0.21 semantics, see ``geometry``) on any device:
``q, k, v`` are ``[batch, *spatial, heads, head_dim]`` (``v`` may have another head_dim).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import recording, switch
from .backends import BACKENDS, auto_choice, calibration, select_backend
from .backends.base import values_readable
from .checks import check_scale
from .problem import make_problem, normalize_axis_arg, normalize_head_groups, per_group_arg

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d", "explain"]


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
    head_groups: Sequence[int] | None = None,
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
            call raises with every reason instead of falling back. ``"auto"`` defers to ``use_backend`` when a
            block is active; an explicit name wins over it.
        rel_pos_bias: optional ``[heads, *(2·kernel_size - 1)]`` table added to the logits, indexed by the
            key − query offset in dilation-group units (NAT's relative position bias).
        key_bias: optional float tensor broadcastable to ``[B, *spatial, heads]`` added to every logit of that key
            (``-inf`` drops the key, e.g. zero padding). Not applied to additional keys. A query whose keys are
            all dropped gets output 0 and lse ``-inf``.
        head_groups: optional sizes of consecutive head groups (summing to ``heads``) that each get their own
            window, e.g. ``head_groups=(2, 2), kernel_size=(3, 7), dilation=(1, 2)`` (FaViT, MoA). ``kernel_size``
            and ``dilation`` then hold one entry per group, each an int or a per-axis sequence (a plain int is
            shared by every group); ``rel_pos_bias`` is ``None`` or one ``[group_heads, *(2·kernel_size-1)]``
            table per group; ``stride``, ``is_causal`` and the other arguments are shared. Adjacent groups with
            equal geometry run as one backend call on head-sliced views of the inputs, and the outputs (and lse)
            are concatenated along the head axis, so every backend supports it.
    """
    if head_groups is not None:
        return _grouped_attention(
            q,
            k,
            v,
            kernel_size,
            stride,
            dilation,
            is_causal,
            scale,
            additional_keys,
            additional_values,
            return_lse,
            backend,
            rel_pos_bias,
            key_bias,
            head_groups,
        )
    problem = make_problem(
        q,
        k,
        v,
        kernel_size,
        stride,
        dilation,
        is_causal,
        additional_keys,
        additional_values,
        rel_pos_bias,
        return_lse,
        key_bias,
    )
    check_scale(scale)
    if scale is None:
        scale = problem.head_dim**-0.5
    chosen = switch.select(backend, problem)
    if backend == "auto" and switch.resolve_backend() == "auto" and calibration.calibration_enabled():
        chosen = _calibrated(chosen, problem, q, k, v, float(scale), additional_keys, additional_values, rel_pos_bias,
                             key_bias)  # fmt: skip
    switch.note("neighborhood", chosen.name)
    if recording.is_recording():
        _record(q, k, v, problem, float(scale), additional_keys, additional_values, rel_pos_bias, key_bias)
    out, lse = chosen.run(
        q,
        k,
        v,
        problem,
        scale=float(scale),
        additional_keys=additional_keys,
        additional_values=additional_values,
        rel_pos_bias=rel_pos_bias,
        key_bias=key_bias,
    )
    return (out, lse) if return_lse else out


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    rel_pos_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> str:
    """Which backend ``neighborhood_attention`` would run these arguments on, and why (nothing is computed), a
    ``use_backend`` block included.

    Same arguments as ``neighborhood_attention`` (without ``scale`` and ``head_groups``); raises as it would.
    """
    problem = make_problem(
        q,
        k,
        v,
        kernel_size,
        stride,
        dilation,
        is_causal,
        additional_keys,
        additional_values,
        rel_pos_bias,
        return_lse,
        key_bias,
    )
    forced = switch.resolve_backend(backend)
    if backend == "auto" and forced != "auto":
        return f"{switch.select(backend, problem).name}: {switch.forced_by(forced)}"
    if backend == "auto":
        chosen, why = auto_choice(problem)
        options = calibration.candidates(problem, BACKENDS)
        names = [b.name for b in options]
        if not calibration.calibration_enabled() or len(options) < 2:
            return f"{chosen.name}: {why}"
        kept = calibration.lookup(problem, options)
        if kept is not None:
            times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(kept["ms"].items(), key=lambda kv: kv[1]))
            return f"{kept['backend']}: calibrated on this machine, fastest of {names} (median: {times})"
        return (
            f"{chosen.name}: {why}; calibration is on, so the first call times {names} on its inputs and keeps "
            "the fastest"
        )
    return f"{select_backend(backend, problem).name}: requested by name"


def _calibrated(chosen, problem, q, k, v, scale, additional_keys, additional_values, rel_pos_bias, key_bias):
    """The calibrated choice among the fast backends that can run ``problem`` (timing them on this call's inputs the
    first time), or ``chosen`` when fewer than two can run it or the inputs cannot be read (tracing, fake tensors)."""
    options = calibration.candidates(problem, BACKENDS)
    if len(options) < 2 or not values_readable(q):
        return chosen
    kept = calibration.lookup(problem, options)
    if kept is None:
        detached = lambda t: None if t is None else t.detach()  # noqa: E731
        extras = {
            "scale": scale,
            "additional_keys": detached(additional_keys),
            "additional_values": detached(additional_values),
            "rel_pos_bias": detached(rel_pos_bias),
            "key_bias": detached(key_bias),
        }

        def trial(backend):
            if problem.requires_grad:  # training: time the forward and its backward
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                with torch.enable_grad():
                    out, _ = backend.run(*leaves, problem, **extras)
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
            else:
                with torch.no_grad():
                    backend.run(q, k, v, problem, **extras)

        kept = calibration.calibrate(problem, options, trial)
    return BACKENDS[kept["backend"]]


def _record(q, k, v, problem, scale, additional_keys, additional_values, rel_pos_bias, key_bias) -> None:
    """Record the dense weights of this call for ``record_attention``."""
    weights = _dense_weights(q, k, problem, scale, additional_keys, rel_pos_bias, key_bias)
    recording.add("neighborhood", weights, problem.spatial_shape, problem.spatial_shape, problem.num_additional)


def _dense_weights(q, k, problem, scale, additional_keys, rel_pos_bias, key_bias) -> torch.Tensor:
    """Dense ``[B, heads, N, N + extra]`` weights of a call: the reference backend with one-hot values."""
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
            q.float(),
            k.float(),
            values,
            problem,
            scale=scale,
            additional_keys=additional_keys,
            additional_values=extra_values,
            rel_pos_bias=None if rel_pos_bias is None else rel_pos_bias.float(),
            key_bias=None if key_bias is None else key_bias.float(),
        )
        return weights.reshape(problem.batch, n, problem.heads, n + extra).transpose(1, 2)


def _head_slice(name: str, t, axis: int, heads: int, start: int, stop: int, *, broadcast: bool = False):
    """Heads ``start:stop`` of an optional per-head tensor, as a view; with ``broadcast`` a size-1 head axis (or
    none at all) passes unchanged. Anything else is left for ``make_problem`` to reject by name."""
    if not isinstance(t, torch.Tensor) or t.dim() < -axis:
        return t
    if broadcast and t.shape[axis] == 1:
        return t
    if t.shape[axis] != heads:
        raise ValueError(f"{name}.shape={tuple(t.shape)} must have heads={heads} entries along dim {axis}")
    return t.narrow(axis, start, stop - start)


def _grouped_attention(
    q,
    k,
    v,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
    additional_keys,
    additional_values,
    return_lse,
    backend,
    rel_pos_bias,
    key_bias,
    head_groups,
):
    """``neighborhood_attention`` with per-head-group kernel_size/dilation: one call per run of equal geometry."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (4, 5, 6) or t.shape[-2] != q.shape[-2]:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must be [batch, *spatial, heads, head_dim] with 1, 2 or 3 spatial "
                f"axes and the heads of q.shape={tuple(q.shape)}"
            )
    rank, heads = q.dim() - 3, int(q.shape[-2])
    groups = normalize_head_groups(head_groups, heads)
    kernels = [
        normalize_axis_arg("kernel_size", kk, rank) for kk in per_group_arg("kernel_size", kernel_size, len(groups))
    ]
    dilations = [normalize_axis_arg("dilation", d, rank) for d in per_group_arg("dilation", dilation, len(groups))]
    if rel_pos_bias is None:
        tables = [None] * len(groups)
    elif isinstance(rel_pos_bias, (tuple, list)) and len(rel_pos_bias) == len(groups):
        tables = list(rel_pos_bias)
        for i, (size, kk, table) in enumerate(zip(groups, kernels, tables)):
            expected = (size, *(2 * kernel - 1 for kernel in kk))
            if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
                got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                raise ValueError(
                    f"rel_pos_bias[{i}].shape={got} must be [group_heads, *(2*kernel_size-1)] = {expected}"
                )
    else:
        raise TypeError(f"rel_pos_bias must be None or a sequence of {len(groups)} per-group tables with head_groups")
    runs: list[tuple[int, int, tuple, tuple, list]] = []  # start, stop, kernel, dilation, tables
    start = 0
    for size, kk, dd, table in zip(groups, kernels, dilations, tables):
        if runs and runs[-1][2:4] == (kk, dd):
            runs[-1] = (runs[-1][0], start + size, kk, dd, runs[-1][4] + [table])
        else:
            runs.append((start, start + size, kk, dd, [table]))
        start += size
    calls = []
    for lo, hi, kk, dd, run_tables in runs:  # validate every call (and pick its backend) before running any
        ak = _head_slice("additional_keys", additional_keys, -2, heads, lo, hi)
        av = _head_slice("additional_values", additional_values, -2, heads, lo, hi)
        kb = _head_slice("key_bias", key_bias, -1, heads, lo, hi, broadcast=True)
        table = None if run_tables[0] is None else (run_tables[0] if len(run_tables) == 1 else torch.cat(run_tables))
        args = (q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], kk, stride, dd, is_causal, ak, av, table)
        problem = make_problem(*args, return_lse, kb)
        calls.append((args, kb, problem, switch.select(backend, problem)))
    check_scale(scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    outs, lses, weights = [], [], []
    for (gq, gk, gv, _, _, _, _, ak, av, table), kb, problem, chosen in calls:
        switch.note("neighborhood", chosen.name)
        if recording.is_recording():
            recording.check_size(problem.num_tokens, problem.num_tokens + problem.num_additional)
            weights.append(_dense_weights(gq, gk, problem, float(scale), ak, table, kb))
        out, lse = chosen.run(
            gq,
            gk,
            gv,
            problem,
            scale=float(scale),
            additional_keys=ak,
            additional_values=av,
            rel_pos_bias=table,
            key_bias=kb,
        )
        outs.append(out)
        lses.append(lse)
    if weights:
        shape = calls[0][2].spatial_shape
        recording.add("neighborhood", torch.cat(weights, dim=1), shape, shape, calls[0][2].num_additional)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    if not return_lse:
        return out
    return out, (lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1))


def _fixed_rank(rank: int):
    def wrapper(
        q,
        k,
        v,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        scale=None,
        additional_keys=None,
        additional_values=None,
        return_lse=False,
        backend="auto",
        rel_pos_bias=None,
        key_bias=None,
        head_groups=None,
    ):
        if not isinstance(q, torch.Tensor) or q.dim() != rank + 3:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"na{rank}d expects q of shape [batch, {rank} spatial axes, heads, head_dim], got {shape}")
        return neighborhood_attention(
            q,
            k,
            v,
            kernel_size,
            stride,
            dilation,
            is_causal,
            scale,
            additional_keys,
            additional_values,
            return_lse,
            backend,
            rel_pos_bias,
            key_bias,
            head_groups,
        )

    wrapper.__name__ = f"na{rank}d"
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = f"{rank}-D neighborhood attention; see ``neighborhood_attention`` for the arguments."
    return wrapper


na1d = _fixed_rank(1)
na2d = _fixed_rank(2)
na3d = _fixed_rank(3)
