"""attnzoo: every attention mechanism and token mixer of the vision-attention literature behind one interface.

``attnzoo.ops`` is the functional engine (generalized neighborhood attention on every device);
``attnzoo.create(name, dim)`` builds any registered mechanism.
"""

from . import ops
from .mechanisms import create, list_families, list_mechanisms, mechanism_info, register_mechanism

__version__ = "0.1.0"

__all__ = ["ops", "create", "list_mechanisms", "list_families", "mechanism_info", "register_mechanism", "__version__"]
