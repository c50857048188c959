"""Shared vocabulary for mechanisms: head arithmetic, argument checks, token-layout helpers."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from einops import rearrange

__all__ = [
    "Mechanism", "resolve_heads", "check_divisible", "check_int", "check_choice", "check_probability", "check_positive",
    "reject_attn_drop", "split_qkv", "merge_heads", "flatten_tokens", "cached_table", "inference_cached",
    "BlockState",
]


def resolve_heads(
    dim: int, num_heads: int | None, head_dim: int | None, *, default_head_dim: int = 32, min_heads: int = 1
) -> tuple[int, int]:
    """``(num_heads, head_dim)`` from the constructor vocabulary; inner width is ``num_heads·head_dim``.

    ``head_dim`` given: heads = ``num_heads`` or ``dim // head_dim``; otherwise ``head_dim = dim // num_heads``
    (``num_heads`` defaulting to the smallest divisor of ``dim`` that is at least ``max(min_heads,
    dim // default_head_dim)``: mechanisms that split their heads into branches ask for one head per branch).
    Raises naming the argument on bad combinations.
    """
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads={num_heads!r} must be a positive int")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"head_dim={head_dim!r} must be a positive int")
    if head_dim is not None:
        if num_heads is None:
            if dim % head_dim:
                raise ValueError(f"dim={dim} must be divisible by head_dim={head_dim} when num_heads is not given")
            num_heads = dim // head_dim
        return num_heads, head_dim
    if num_heads is None:
        fewest = max(min_heads, dim // default_head_dim)
        num_heads = next((h for h in range(fewest, dim + 1) if dim % h == 0), 0)
        if not num_heads:
            raise ValueError(f"dim={dim} has no divisor >= {fewest} to use as the default num_heads; pass num_heads")
    if dim % num_heads:
        raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    return num_heads, dim // num_heads


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def check_int(name: str, value: Any, minimum: int = 1, *, odd: bool = False) -> int:
    """``value`` if it is an int >= ``minimum`` (and odd when ``odd``), else a ValueError naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name}={value} must be odd (same-size zero padding needs a centred kernel)")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r} must be one of {tuple(choices)}")
    return value


def check_probability(name: str, p: Any) -> float:
    """``p`` as a float in [0, 1) (a dropout rate), or a ValueError naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p!r} must be a probability in [0, 1)")
    return float(p)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float > 0 (a ratio, a scale, an epsilon), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite positive number")
    return float(value)


def reject_attn_drop(attn_drop: Any) -> None:
    """Mechanisms on the fused neighborhood kernel have no attention-weight dropout."""
    if attn_drop:
        raise ValueError(f"attn_drop={attn_drop} is not supported by the fused neighborhood op; use 0.0")


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, *tokens, 3·heads·d)`` from a fused qkv projection → q, k, v ``(B, *tokens, heads, d)``."""
    q, k, v = rearrange(qkv, "b ... (three h d) -> three b ... h d", three=3, h=heads)
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, *tokens, heads, d)`` → ``(B, *tokens, heads·d)``."""
    return rearrange(x, "b ... h d -> b ... (h d)")


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, *spatial, C)`` → ``(B, N, C)``, row-major (last spatial axis fastest)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def cached_table(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` for an ``lru_cache``-wrapped geometry table; while compiling, the unwrapped function (Dynamo
    traces it into constants anyway and would warn about the cache wrapper)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def inference_cached(
    module: nn.Module, slot: str, key: tuple, compute: Callable[[], torch.Tensor], *params: torch.Tensor | None
) -> torch.Tensor:
    """``compute()`` (e.g. a bias gathered from a parameter table), reused across calls while autograd is off and
    nothing is traced; cached on ``module`` under ``slot``, keyed by ``key`` and the versions of ``params`` (an
    in-place edit or ``load_state_dict`` invalidates it). With gradients on it is recomputed every call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return compute()
    full_key = (key, tuple((id(p), p._version) for p in params if p is not None))
    cached = module.__dict__.get(slot)
    if cached is not None and cached[0] == full_key:
        return cached[1]
    value = compute()
    if type(value) is torch.Tensor:  # never keep a fake (traced) tensor
        module.__dict__[slot] = (full_key, value)
    return value


class BlockState:
    """State carried from block to block inside one backbone stage (the cross-block protocol).

    A mechanism that sets ``uses_block_state = True`` takes ``forward(x, state=None)``. The backbone creates one
    ``BlockState`` per stage and forward pass and hands the same object to every block of the stage in order, so a
    block reads what the blocks before it wrote (``read``) and adds its own entry (``write``). ``state=None`` (a
    standalone call) means no earlier blocks. Entries are keyed by the writer's mechanism name, so mechanisms of
    different kinds never read each other's entries; nothing outlives the forward pass.
    """

    def __init__(self) -> None:
        self.entries: dict[str, list[Any]] = {}

    def read(self, key: str) -> list[Any]:
        """What earlier blocks wrote under ``key``, oldest first (empty when none did)."""
        return list(self.entries.get(key, ()))

    def write(self, key: str, value: Any) -> None:
        self.entries.setdefault(key, []).append(value)


class Mechanism(nn.Module):
    """Base class: channels-last ``(B, *spatial, C) -> (B, *spatial, C)`` with one input check.

    Subclasses set ``spatial_ranks`` (accepted numbers of spatial axes) and implement ``forward``; ``output_shape``
    says what shape ``forward`` returns for an input shape (identity unless the mechanism resamples).
    ``uses_block_state = True`` declares ``forward(x, state: BlockState | None = None)``: the backbone then passes its
    stage's ``BlockState`` (see there); every other mechanism is called as ``forward(x)``.
    """

    mechanism_name: str = ""
    spatial_ranks: Sequence[int] = (2,)
    uses_block_state: bool = False

    def __init__(self, dim: int, rank: int | None = None) -> None:
        """``rank``: for mechanisms that work on 1-, 2- or 3-D grids, the number of spatial axes this instance takes
        (one of the class's ``spatial_ranks``)."""
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive int")
        self.dim = dim
        if rank is not None:
            self.rank = check_choice("rank", rank, type(self).spatial_ranks)
            self.spatial_ranks = (rank,)

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate ``x`` (a floating tensor ``(batch, *spatial, dim)``, not empty) and return its spatial shape.

        Empty input (batch 0 or a zero-size spatial axis) is refused here, once for every mechanism, with a
        ``ValueError`` naming the input shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        rank = x.dim() - 2
        if rank not in tuple(self.spatial_ranks):
            axes = " or ".join(str(r) for r in self.spatial_ranks)
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, *spatial, dim) with {axes} spatial axes, "
                f"got x.shape={tuple(x.shape)}"
            )
        if x.shape[-1] != self.dim:
            raise ValueError(f"x.shape={tuple(x.shape)} must end in dim={self.dim}")
        if not x.is_floating_point():
            raise TypeError(f"x.dtype={x.dtype} must be floating point")
        if x.numel() == 0:
            raise ValueError(
                f"{type(self).__name__} got an empty input x.shape={tuple(x.shape)}: the batch and every spatial axis "
                "must have at least one element"
            )
        return tuple(x.shape[1:-1])

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
