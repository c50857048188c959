"""attnzoo: every attention mechanism and token mixer of the vision-attention literature behind one interface.

``attnzoo.ops`` is the functional engine (generalized neighborhood attention on every device);
``attnzoo.create(name, dim)`` builds any registered mechanism; ``attnzoo.models`` has backbones with a pluggable
mixer per stage (registered with timm as ``attnzoo_tiny`` / ``attnzoo_small`` when timm is installed); ``attnzoo.swap(model)`` runs a timm model's attention on attnzoo mechanisms (or swaps it for
another one) and is the only entry point that imports timm, on its first call.
"""

from . import mechanisms, models, ops
from .mechanisms import create, list_families, list_mechanisms, mechanism_info, register_mechanism

__version__ = "0.1.0"


def swap(model, mixer=None, strict=False, **mixer_kwargs):
    """Replace the attention modules of a timm ``model`` by attnzoo mechanisms in place; see
    ``attnzoo.interop.timm.swap`` (imported on first call, so importing attnzoo never imports timm)."""
    from .interop.timm import swap as _swap

    return _swap(model, mixer, strict, **mixer_kwargs)


__all__ = ["ops", "mechanisms", "models", "create", "list_mechanisms", "list_families", "mechanism_info", "register_mechanism", "swap", "__version__"]
