"""The library behind ``attnzoo bench`` and ``attnzoo viz``: costs, receptive fields, attention maps, reports.

``count_flops`` is the engine's FLOP counter (``attnzoo.ops.flops``), re-exported for the tools' users.
"""

from ..ops import count_flops
from .bench import BenchConfig, BenchRow, bench_mechanism
from .costs import count_parameters, fit_exponent, median_latency, peak_memory_bytes
from .receptive import (
    attention_maps,
    gradient_receptive_field,
    mechanism_view,
    structural_copy,
)
from .workload import make_inputs, prepare

__all__ = [
    "BenchConfig",
    "BenchRow",
    "bench_mechanism",
    "count_parameters",
    "count_flops",
    "fit_exponent",
    "median_latency",
    "peak_memory_bytes",
    "attention_maps",
    "gradient_receptive_field",
    "mechanism_view",
    "structural_copy",
    "make_inputs",
    "prepare",
]
