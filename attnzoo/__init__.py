"""attnzoo: every attention mechanism and token mixer of the vision-attention literature behind one interface.

``attnzoo.ops`` is the functional engine (generalized neighborhood attention on every device);
``attnzoo.create(name, dim)`` builds any registered mechanism; ``attnzoo.models`` has backbones with a pluggable
mixer per stage (registered with timm as ``attnzoo_tiny`` / ``attnzoo_small`` when timm is installed).
"""

from . import mechanisms, models, ops
from .mechanisms import BlockState, create, list_families, list_mechanisms, mechanism_info, register_mechanism

__version__ = "0.1.0"

__all__ = [
    "ops", "mechanisms", "models", "create", "list_mechanisms", "list_families", "mechanism_info", "register_mechanism",
    "BlockState", "__version__",
]  # fmt: skip
