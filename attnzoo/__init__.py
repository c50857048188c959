"""attnzoo: every attention mechanism and token mixer of the vision-attention literature behind one interface.

``attnzoo.ops`` is the functional engine (generalized neighborhood attention on every device);
``attnzoo.create(name, dim)`` builds any registered mechanism; ``attnzoo.models`` has backbones with a pluggable
mixer per stage (registered with timm as ``attnzoo_tiny`` / ``attnzoo_small`` when timm is installed);
``attnzoo.swap(model)`` runs a timm model's attention on attnzoo mechanisms (or swaps it for another one) and is the
only entry point that imports timm, on its first call.
"""

from __future__ import annotations

from typing import Any

import torch

from . import mechanisms, models, ops
from .mechanisms import BlockState, create, list_families, list_mechanisms, mechanism_info, register_mechanism
from .ops import use_backend

__version__ = "0.2.0"


def swap(model: torch.nn.Module, mixer: str | None = None, strict: bool = False, **mixer_kwargs: Any) -> list:
    """Replace the attention modules of a timm ``model`` by attnzoo mechanisms in place and return the report (one
    ``SwapEntry`` per attention-like module); see ``attnzoo.interop.timm.swap`` (imported on first call, so
    importing attnzoo never imports timm).

    Args:
        model: the timm model, changed in place.
        mixer: ``None`` keeps each module's mechanism and weights; a registered name swaps that mechanism in.
        strict: raise a ValueError naming the attention modules that would be left alone.
        **mixer_kwargs: constructor arguments for ``mixer``.
    """
    from .interop.timm import swap as _swap

    return _swap(model, mixer, strict, **mixer_kwargs)


__all__ = [
    "ops", "mechanisms", "models", "create", "list_mechanisms", "list_families", "mechanism_info", "register_mechanism",
    "BlockState", "swap", "use_backend", "__version__",
]  # fmt: skip
