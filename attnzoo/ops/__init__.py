"""attnzoo.ops: the functional layer (NATTEN layout ``[batch, *spatial, heads, head_dim]``)."""

from .attention import attention, merge_attentions
from .backends import list_backends
from .backends.base import compute_dtype
from .backends.calibration import set_auto_calibration
from .flops import count_flops
from .geometry import neighborhood_mask, neighborhood_rel_index
from .neighborhood import explain, na1d, na2d, na3d, neighborhood_attention
from .problem import normalize_axis_arg
from .recording import AttentionRecord, record_attention
from .scan import selective_scan
from .switch import BackendRun, record_backends, resolve_backend, use_backend

__all__ = [
    "compute_dtype",
    "count_flops",
    "neighborhood_attention",
    "na1d",
    "na2d",
    "na3d",
    "explain",
    "attention",
    "merge_attentions",
    "neighborhood_mask",
    "neighborhood_rel_index",
    "list_backends",
    "set_auto_calibration",
    "normalize_axis_arg",
    "record_attention",
    "AttentionRecord",
    "selective_scan",
    "use_backend",
    "resolve_backend",
    "record_backends",
    "BackendRun",
]
