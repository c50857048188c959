"""The mechanism registry: canonical names → module class + metadata (the catalogue ``attnzoo docs`` builds)."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

import torch.nn as nn

__all__ = ["MechanismInfo", "register_mechanism", "create", "list_mechanisms", "mechanism_info", "list_families"]

LAYOUTS = ("spatial", "sequence", "cross")
COMPLEXITIES = ("quadratic", "linear", "N·k")
SLOTS = ("token", "channel")
RECEPTIVE_FIELDS = ("global", "local", "causal", "channel")
SIZE_RULES = ("extent", "kernel", "span", "dilation", "ratio", "count")


@dataclass(frozen=True)
class MechanismInfo:
    """What the registry knows about a mechanism: ``register_mechanism(name, **fields)`` takes exactly these fields
    (``name`` and ``cls`` aside), so adding one means adding it here only.

    family, paper, year: the mechanism's family and the paper (authors, title) and year that introduced it.
    layout: ``"spatial"`` takes ``(B, *spatial, C)``; ``"sequence"`` takes ``(B, N, C)`` (and flattens a spatial
    input row-major); ``"cross"`` takes ``(x, context=None)``.
    native_rank: the number of spatial axes of the paper's setting.
    complexity: cost in the token count N: ``"quadratic"``, ``"linear"`` or ``"N·k"`` (a fixed neighbourhood).
    reference: the official code (or the paper) the implementation follows.
    needs_input_size: the constructor needs the token grid (``input_resolution``) up front.
    paper_identity: the paper's module adds its input back (output = x + this module's output); here that
    identity is left to the block.
    is_attention: the mechanism forms attention weights (``attnzoo viz`` can show them); convolutional, gating and
    state-space mixers do not.
    slot: ``"token"`` mixes tokens (the attention slot of a block); ``"channel"`` replaces a block's MLP.
    receptive_field: what one output token depends on in the default configuration: ``"global"`` (every token),
    ``"local"`` (a bounded neighbourhood of the query), ``"causal"`` (tokens up to the query in raster order),
    ``"channel"`` (its own token only: a per-token gate or channel mixer).
    note: what was implemented where the paper's definition is uncertain, and from which source.
    test_kwargs / test_size / test_dim: a small configuration the conformance suite builds and runs.
    size_args: the constructor arguments that are spatial sizes, each with how a backbone fits it to a stage's token
    grid (``docs/vocabulary.md``): ``"extent"`` (a window or pool side), ``"kernel"`` (a sliding or convolution
    kernel; an odd one may be kept odd), ``"span"`` (a neighbourhood's kernel_size: kernel_size·dilation fits),
    ``"dilation"`` (a neighbourhood's dilation: two taps fit), ``"ratio"`` (a down-sampling factor such as
    ``sr_ratio``) or ``"count"`` (windows per side); each at most the grid's side.
    """

    name: str
    cls: type
    family: str
    paper: str
    year: int
    layout: str = field(default="spatial", metadata={"choices": LAYOUTS})
    native_rank: int = 2
    complexity: str = field(default="quadratic", metadata={"choices": COMPLEXITIES})
    reference: str = ""
    needs_input_size: bool = False
    paper_identity: bool = False
    is_attention: bool = True
    slot: str = field(default="token", metadata={"choices": SLOTS})
    receptive_field: str = field(default="global", metadata={"choices": RECEPTIVE_FIELDS})
    note: str = ""
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    test_size: tuple[int, ...] = (8, 8)
    test_dim: int = 32
    size_args: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} must be one of {choices}")
        object.__setattr__(self, "test_kwargs", dict(self.test_kwargs or {}))  # a copy: the registry owns it
        object.__setattr__(self, "test_size", tuple(self.test_size))
        object.__setattr__(self, "size_args", dict(self.size_args or {}))
        if any(rule not in SIZE_RULES for rule in self.size_args.values()):
            raise ValueError(f"size_args={self.size_args!r}: each rule must be one of {SIZE_RULES}")

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name


# The fields a registration gives (every MechanismInfo field but the two the decorator supplies).
_FIELDS = {f.name: f for f in fields(MechanismInfo) if f.name not in ("name", "cls")}
_REQUIRED = sorted(n for n, f in _FIELDS.items() if f.default is MISSING and f.default_factory is MISSING)

_REGISTRY: dict[str, MechanismInfo] = {}


def register_mechanism(name: str, **metadata: Any) -> Callable[[type], type]:
    """Class decorator that registers an ``nn.Module`` under its canonical ``name``; ``metadata`` are the fields of
    ``MechanismInfo`` (``family``, ``paper`` and ``year`` required), checked when the class is decorated (names here, values by ``MechanismInfo``)."""
    unknown = sorted(set(metadata) - set(_FIELDS))
    if unknown:
        raise TypeError(
            f"register_mechanism({name!r}) got unknown fields {unknown}; MechanismInfo has {sorted(_FIELDS)}"
        )
    missing = [n for n in _REQUIRED if n not in metadata]
    if missing:
        raise TypeError(f"register_mechanism({name!r}) needs the fields {missing}")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_mechanism({name!r}) decorates nn.Module subclasses, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"mechanism name {name!r} is already registered by {_REGISTRY[name].cls.__qualname__}")
        _REGISTRY[name] = MechanismInfo(name=name, cls=cls, **metadata)
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
