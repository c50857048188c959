"""The mechanism registry: canonical names → module class + metadata (the catalogue ``attnzoo docs`` builds)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

__all__ = ["MechanismInfo", "register_mechanism", "create", "list_mechanisms", "mechanism_info", "list_families"]

LAYOUTS = ("spatial", "sequence", "cross")
COMPLEXITIES = ("quadratic", "linear", "N·k")
SLOTS = ("token", "channel")
RECEPTIVE_FIELDS = ("global", "local", "causal", "channel")


@dataclass(frozen=True)
class MechanismInfo:
    """What the registry knows about a mechanism.

    layout: ``"spatial"`` takes ``(B, *spatial, C)``; ``"sequence"`` takes ``(B, N, C)`` (and flattens a spatial
    input row-major); ``"cross"`` takes ``(x, context=None)``.
    slot: ``"token"`` mixes tokens (the attention slot of a block); ``"channel"`` replaces a block's MLP.
    receptive_field: what one output token depends on in the default configuration: ``"global"`` (every token),
    ``"local"`` (a bounded neighbourhood of the query), ``"causal"`` (tokens up to the query in raster order),
    ``"channel"`` (its own token only: a per-token gate or channel mixer).
    note: what was implemented where the paper's definition is uncertain, and from which source.
    test_kwargs / test_size / test_dim: a small configuration the conformance suite builds and runs.
    """

    name: str
    cls: type
    family: str
    paper: str
    year: int
    layout: str = "spatial"
    native_rank: int = 2
    complexity: str = "quadratic"
    reference: str = ""
    needs_input_size: bool = False
    paper_identity: bool = False
    causal_capable: bool = False
    is_attention: bool = True
    slot: str = "token"
    receptive_field: str = "global"
    note: str = ""
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    test_size: tuple[int, ...] = (8, 8)
    test_dim: int = 32

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name


_REGISTRY: dict[str, MechanismInfo] = {}


def register_mechanism(
    name: str,
    *,
    family: str,
    paper: str,
    year: int,
    layout: str = "spatial",
    native_rank: int = 2,
    complexity: str = "quadratic",
    reference: str = "",
    needs_input_size: bool = False,
    paper_identity: bool = False,
    causal_capable: bool = False,
    is_attention: bool = True,
    slot: str = "token",
    receptive_field: str = "global",
    note: str = "",
    test_kwargs: dict[str, Any] | None = None,
    test_size: tuple[int, ...] = (8, 8),
    test_dim: int = 32,
) -> Callable[[type], type]:
    """Class decorator that registers an ``nn.Module`` under its canonical ``name`` with its metadata."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if complexity not in COMPLEXITIES:
        raise ValueError(f"complexity={complexity!r} must be one of {COMPLEXITIES}")
    if slot not in SLOTS:
        raise ValueError(f"slot={slot!r} must be one of {SLOTS}")
    if receptive_field not in RECEPTIVE_FIELDS:
        raise ValueError(f"receptive_field={receptive_field!r} must be one of {RECEPTIVE_FIELDS}")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_mechanism({name!r}) decorates nn.Module subclasses, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"mechanism name {name!r} is already registered by {_REGISTRY[name].cls.__qualname__}")
        _REGISTRY[name] = MechanismInfo(
            name=name, cls=cls, family=family, paper=paper, year=year, layout=layout, native_rank=native_rank,
            complexity=complexity, reference=reference, needs_input_size=needs_input_size,
            paper_identity=paper_identity, causal_capable=causal_capable, is_attention=is_attention, slot=slot,
            receptive_field=receptive_field, note=note,
            test_kwargs=dict(test_kwargs or {}), test_size=tuple(test_size), test_dim=test_dim,
        )
        cls.mechanism_name = name
        return cls

    return decorate


def _lookup(name: str) -> MechanismInfo:
    from . import load_all

    load_all()
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a string, got {type(name).__name__}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown mechanism {name!r}{hint} (attnzoo.list_mechanisms() lists all {len(_REGISTRY)})")
    return _REGISTRY[name]


def create(name: str, dim: int, **kwargs: Any) -> nn.Module:
    """Build the mechanism registered as ``name`` for ``dim`` channels, with the paper's defaults."""
    info = _lookup(name)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim={dim!r} must be a positive int")
    return info.cls(dim, **kwargs)


def mechanism_info(name: str) -> MechanismInfo:
    """Family, paper, year, layout, complexity and external reference of ``name``."""
    return _lookup(name)


def list_mechanisms(family: str | None = None) -> list[str]:
    """Canonical names, sorted, optionally of one ``family``."""
    from . import load_all

    load_all()
    if family is not None and family not in list_families():
        raise ValueError(f"family={family!r} is unknown; families: {list_families()}")
    return sorted(n for n, i in _REGISTRY.items() if family is None or i.family == family)


def list_families() -> list[str]:
    from . import load_all

    load_all()
    return sorted({i.family for i in _REGISTRY.values()})
