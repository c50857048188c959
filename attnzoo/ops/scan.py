"""Selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

Per channel ``d`` and state ``n``, along a scan order ``t = 0..L−1``::

    h_t[d, n] = exp(Δ_t[d]·A[d, n])·h_{t−1}[d, n] + Δ_t[d]·B_t[n]·u_t[d],      h_{−1} = 0
    y_t[d]    = Σ_n C_t[n]·h_t[d, n] + D[d]·u_t[d]

``selective_scan`` computes it in two equal forms: ``mode="recurrent"`` (the recurrence above, one token at a time:
the oracle) and ``mode="chunkwise"`` (the default): the order is cut into chunks of ``chunk_size`` tokens; a pass
over the ``chunk_size`` positions of all chunks at once gives the state each chunk hands on, a short recurrence
over the chunks carries it, and a second pass produces every state, contracted with ``C`` in one product. Python
steps: ``2·chunk_size + L / chunk_size`` instead of ``L``; work and memory O(L·d·n).

The scan order is any token permutation ``order`` (per channel group), so one op serves row-major, column-major,
reversed and any other 2-D route: the op gathers, scans, and scatters the outputs back to token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends.base import compute_dtype, values_readable

__all__ = ["selective_scan", "SCAN_MODES"]

SCAN_MODES = ("chunkwise", "recurrent")


def _check_inputs(u, delta, A, B, C, D, order, chunk_size, mode) -> tuple[int, int]:
    """Shapes and types, before any work; returns ``(groups, d_state)``."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype} must be floating point")
    if u.dim() != 3:
        raise ValueError(f"u.shape={tuple(u.shape)} must be [batch, length, channels]")
    if delta.shape != u.shape:
        raise ValueError(f"delta.shape={tuple(delta.shape)} must equal u.shape={tuple(u.shape)}")
    batch, length, channels = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A.shape={tuple(A.shape)} must be [channels={channels}, d_state]")
    d_state = A.shape[1]
    if B.dim() not in (3, 4) or B.shape[:2] != (batch, length) or B.shape[-1] != d_state:
        raise ValueError(
            f"B.shape={tuple(B.shape)} must be [batch={batch}, length={length}, d_state={d_state}] or "
            f"[batch, length, groups, d_state]"
        )
    if C.shape != B.shape:
        raise ValueError(f"C.shape={tuple(C.shape)} must equal B.shape={tuple(B.shape)}")
    groups = B.shape[2] if B.dim() == 4 else 1
    if groups < 1 or channels % groups:
        raise ValueError(f"channels={channels} must be divisible by the groups={groups} of B and C")
    if D is not None and (not isinstance(D, torch.Tensor) or D.shape != (channels,)):
        raise ValueError(f"D must be None or a tensor of shape [channels={channels}], got {getattr(D, 'shape', D)}")
    if order is not None:
        if not isinstance(order, torch.Tensor) or order.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"order must be an integer tensor (a token permutation), got {order!r:.80}")
        if order.shape not in ((length,), (groups, length)):
            raise ValueError(f"order.shape={tuple(order.shape)} must be [length={length}] or [groups={groups}, length]")
        if values_readable(order) and length:
            expected = torch.arange(length, device=order.device)
            if not bool((order.sort(dim=-1).values == expected).all()):
                raise ValueError(f"order must be a permutation of 0..{length - 1} along its last axis")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    if mode not in SCAN_MODES:
        raise ValueError(f"mode={mode!r} must be one of {SCAN_MODES}")
    return groups, d_state


def _permute(t: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[l, g], g, ...]`` for ``t [B, L, G, ...]``, with ``flat_index = index·G + g`` flattened ``[L·G]``
    (one ``index_select`` on the merged token·group axis: much faster than ``gather`` with an expanded index)."""
    return t.flatten(1, 2).index_select(1, flat_index).view(t.shape)


def _recurrent(delta, A, delta_u, B, C):
    """The recurrence, one token at a time. ``delta, delta_u [B, L, G, dg]``, ``A [G, dg, n]``, ``B, C [B, L, G, n]``."""
    state = delta.new_zeros(*delta.shape[:1], *delta.shape[2:], A.shape[-1])
    outputs = []
    for t in range(delta.shape[1]):
        state = torch.exp(delta[:, t, ..., None] * A) * state + delta_u[:, t, ..., None] * B[:, t, :, None]
        outputs.append(torch.einsum("bgdn,bgn->bgd", state, C[:, t]))
    return torch.stack(outputs, dim=1)


def _chunkwise(delta, A, delta_u, B, C, chunk_size: int):
    """Chunked form; same arguments as ``_recurrent``. Padding steps (Δ = 0, zero drive) come last.

    Tensors are laid out ``[T, B, M, ...]`` (position in chunk first) so every step reads contiguous memory; the
    ``d·n``-wide decay and drive of a step are made inside the step.
    Pass 1 runs all chunks from a zero state to get the state each chunk hands on; a recurrence over the chunks
    (decay ``exp(A·ΣΔ)`` per chunk) turns those into the state entering every chunk; pass 2 reruns all chunks from
    their entering states and keeps every state.
    """
    length = delta.shape[1]
    pad = -length % chunk_size
    if pad:
        delta, delta_u, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (delta, delta_u, B, C))
    delta, delta_u, B, C = (t.unflatten(1, (-1, chunk_size)).movedim(2, 0).contiguous() for t in (delta, delta_u, B, C))

    # Decay and drive of position t of every chunk, [B, M, G, dg, n]. A one-wide state's are as small as the inputs
    # and are made once; a wide state's are made per step (a cache-sized slice), which costs less than making all
    # L·d·n at once (that leaves the cache at large L), even though pass 1 and pass 2 each make them.
    wide = A.shape[-1] > 1
    if not wide:
        decays, drives = torch.exp(delta[..., None] * A), delta_u[..., None] * B[..., None, :]

    def decay_at(t: int) -> torch.Tensor:
        return torch.exp(delta[t][..., None] * A) if wide else decays[t]

    def drive_at(t: int) -> torch.Tensor:
        return delta_u[t][..., None] * B[t][..., None, :] if wide else drives[t]

    handed_on = drive_at(0)
    for t in range(1, chunk_size):  # pass 1: chunk-local end states, all chunks at once
        handed_on = torch.addcmul(drive_at(t), decay_at(t), handed_on)
    chunk_decay = torch.exp(delta.sum(dim=0)[..., None] * A)  # [B, M, G, dg, n]
    entering, state = [], torch.zeros_like(handed_on[:, 0])
    for m in range(handed_on.shape[1]):  # the state entering chunk m
        entering.append(state)
        state = torch.addcmul(handed_on[:, m], chunk_decay[:, m], state)
    state = torch.stack(entering, dim=1)  # [B, M, G, dg, n]
    states, outputs = [], []
    for t in range(chunk_size):  # pass 2: every chunk advances one position at a time, in parallel
        state = torch.addcmul(drive_at(t), decay_at(t), state)
        if not wide:  # a one-wide state is as small as the output: keep it, contract once below
            states.append(state)
        else:  # a wide state: contract now rather than keep all L·d·n states
            outputs.append(torch.einsum("bmgdn,bmgn->bmgd", state, C[t]))
    if states:
        return torch.einsum("tbmgdn,tbmgn->bmtgd", torch.stack(states), C).flatten(1, 2)[:, :length]
    return torch.stack(outputs, dim=2).flatten(1, 2)[:, :length]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    order: torch.Tensor | None = None,
    chunk_size: int = 64,
    mode: str = "chunkwise",
) -> torch.Tensor:
    """Mamba's selective scan with input-dependent ``Δ, B, C`` over any token order.

    Args:
        u: inputs ``[batch, length, channels]``.
        delta: step sizes ``Δ`` (already positive, e.g. after softplus), shape of ``u``.
        A: state matrix diagonal ``[channels, d_state]`` (negative for a decaying state).
        B, C: input and output projections ``[batch, length, d_state]`` (one group) or
            ``[batch, length, groups, d_state]``: channel group ``g`` (``channels // groups`` consecutive channels)
            uses ``B[:, :, g]``, ``C[:, :, g]``; all indexed by token position.
        D: skip weights ``[channels]`` or None.
        order: token permutation ``[length]`` (all groups) or ``[groups, length]``: step ``t`` of group ``g``'s scan
            visits token ``order[g, t]``; outputs are returned at token positions. None = ``0..length−1``.
        chunk_size: chunk length of the chunkwise form.
        mode: ``"chunkwise"`` (default) or ``"recurrent"`` (the one-token-at-a-time oracle); equal results.

    Returns ``y`` of the shape and dtype of ``u``; half-precision inputs are scanned with a float32 state.
    """
    groups, d_state = _check_inputs(u, delta, A, B, C, D, order, chunk_size, mode)
    dtype = u.dtype
    ct = compute_dtype(dtype)
    batch, length, channels = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    u_g, delta_g = (t.to(ct).unflatten(2, (groups, -1)) for t in (u, delta))  # [B, L, G, dg]
    B, C = B.to(ct), C.to(ct)
    if order is not None:
        index = order.to(torch.int64).reshape(-1, length).expand(groups, length).t()  # [L, G]
        offsets = torch.arange(groups, device=index.device)
        forward, backward = index * groups + offsets, index.argsort(dim=0) * groups + offsets
        u_g, delta_g, B, C = (_permute(t, forward.reshape(-1)) for t in (u_g, delta_g, B, C))
    A_g = A.to(ct).reshape(groups, channels // groups, d_state)
    if length == 0 or batch == 0:
        y = u_g.new_zeros(u_g.shape)
    elif mode == "recurrent":
        y = _recurrent(delta_g, A_g, delta_g * u_g, B, C)
    else:
        y = _chunkwise(delta_g, A_g, delta_g * u_g, B, C, chunk_size)
    if order is not None:
        y = _permute(y, backward.reshape(-1))
    y = y.flatten(2)
    if D is not None:
        y = y + D.to(ct) * u.to(ct)
    return y.to(dtype)
