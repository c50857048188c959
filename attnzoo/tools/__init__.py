"""The library behind ``attnzoo bench`` and ``attnzoo viz``: costs, receptive fields, attention maps, reports.

Importing it registers FLOP formulas for the engine's custom ops (``tools.flops``) with
``torch.utils.flop_counter``.
"""

from . import flops
from .bench import BenchConfig, BenchRow, bench_mechanism
from .costs import count_parameters, fit_exponent, median_latency, peak_memory_bytes
from .flops import count_flops
from .receptive import attention_maps, gradient_receptive_field, mechanism_view, structural_copy
from .workload import make_inputs, prepare

__all__ = [
    "flops", "BenchConfig", "BenchRow", "bench_mechanism", "count_parameters", "count_flops", "fit_exponent",
    "median_latency", "peak_memory_bytes", "attention_maps", "gradient_receptive_field", "mechanism_view",
    "structural_copy", "make_inputs", "prepare",
]
