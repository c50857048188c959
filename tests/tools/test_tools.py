"""attnzoo.tools: FLOP formula, memory and scaling measurement, receptive fields, attention maps, reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.ops import flops
from attnzoo.tools import costs, receptive, workload
from attnzoo.tools.bench import BenchConfig, BenchRow, ScalingPoint, bench_mechanism
from attnzoo.tools.report import write_report

NA = attnzoo.mechanism_info("neighborhood")


def na_module(kernel: int = 5, dim: int = 16, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return attnzoo.create("neighborhood", dim, num_heads=2, kernel_size=kernel, **kwargs).eval()


def test_na_forward_flop_formula_counts_the_window_matmuls():
    m = na_module(kernel=5)
    x = torch.randn(2, 9, 10, 16)
    total = flops.count_flops(lambda: m(x))
    linear = 2 * (2 * 90) * 16 * (3 * 16) + 2 * (2 * 90) * 16 * 16  # qkv and proj matmuls
    assert total - linear == 4 * 2 * 2 * 90 * 25 * 8  # 4·B·heads·N·k²·d


def test_na_backward_counts_twice_the_forward():
    q, k, v = (torch.randn(1, 8, 8, 2, 4, requires_grad=True) for _ in range(3))
    fwd = flops.count_flops(lambda: attnzoo.ops.na2d(q, k, v, kernel_size=3, backend="native"))
    both = flops.count_flops(lambda: attnzoo.ops.na2d(q, k, v, kernel_size=3, backend="native").sum().backward())
    assert fwd == 4 * 1 * 2 * 64 * 9 * 4
    assert both == 3 * fwd


def test_additional_keys_are_counted():
    q, k, v = (torch.randn(1, 8, 8, 2, 4) for _ in range(3))
    extra = torch.randn(1, 3, 2, 4)
    n = flops.count_flops(
        lambda: attnzoo.ops.na2d(q, k, v, 3, additional_keys=extra, additional_values=extra, backend="native")
    )
    assert n == 4 * 2 * 64 * (9 + 3) * 4


@pytest.mark.parametrize("masked", [False, True])
def test_dense_attention_on_cpu_is_counted(masked):
    """SDPA's CPU kernel (with or without a mask) counts QKᵀ and PV: 4·B·heads·Nq·Nk·d forward; the backward 2.5
    times that (torch's SDPA formula: dV, dP, dQ, dK and the recomputed QKᵀ)."""
    q, k, v = (torch.randn(2, 10, 3, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(10, 10, dtype=torch.bool).tril() if masked else None
    fwd = flops.count_flops(lambda: attnzoo.ops.attention(q, k, v, attn_mask=mask))
    assert fwd == 4 * 2 * 3 * 10 * 10 * 8
    both = flops.count_flops(lambda: attnzoo.ops.attention(q, k, v, attn_mask=mask).sum().backward())
    assert both == 3.5 * fwd


def test_fft_flops_are_counted():
    x = torch.randn(2, 8, 8, 4)
    n = flops.count_flops(lambda: torch.fft.irfft2(torch.fft.rfft2(x, dim=(1, 2)), s=(8, 8), dim=(1, 2)))
    assert n == 2 * flops.fft_flops((2, 8, 8, 4), (1, 2), complex_transform=False) == 2 * int(2.5 * 8 * 64 * 6)


def test_fit_exponent_recovers_power_laws_and_skips_missing_points():
    tokens = [64, 256, 1024, 4096]
    assert costs.fit_exponent(tokens, [3 * t for t in tokens]) == pytest.approx(1.0)
    assert costs.fit_exponent(tokens, [1e-6 * t**2 for t in tokens]) == pytest.approx(2.0)
    assert costs.fit_exponent(tokens, [1.0, math.nan, 16.0, math.nan]) == pytest.approx(1.0)
    assert math.isnan(costs.fit_exponent([64], [1.0]))


def test_peak_memory_sees_a_temporary_buffer():
    def work():
        big = torch.ones(1024, 1024)  # 4 MiB, freed before returning
        return big.sum()

    peak = costs.peak_memory_bytes(work)
    assert 4 * 2**20 <= peak < 5 * 2**20


def test_peak_memory_of_neighborhood_is_linear_in_tokens():
    m = na_module()
    small, large = (costs.peak_memory_bytes(costs.make_step(m, (torch.randn(1, s, s, 16),), False)) for s in (8, 16))
    assert large / small == pytest.approx(4.0, rel=0.05)


def test_reference_check_and_step_with_backward():
    m = na_module()
    x = torch.randn(1, 8, 8, 16)
    assert costs.reference_check(m, (x,)) == "ref ok"
    step = costs.make_step(m, (x,), backward=True)
    grads = []
    hook = m.proj.weight.register_hook(lambda g: grads.append(g.abs().sum()))
    step()
    hook.remove()
    assert len(grads) == 1 and grads[0] > 0 and m.proj.weight.grad is None  # backward ran; gradients dropped after
    plain = torch.nn.Linear(16, 16)
    assert costs.reference_check(plain, (x,)) == "finite"


class _BackendSensitive(torch.nn.Module):
    """Doubles its output on the reference backend only (as a buggy fast backend would look), or returns NaN."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.nan = nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], -1, 1, x.shape[-1])
        y = ops.attention(tokens, tokens, tokens).reshape(x.shape)
        if self.nan:
            return y * math.nan
        return 2 * y if ops.resolve_backend() == "reference" else y


def test_reference_check_reports_mismatch_and_non_finite_output():
    x = torch.randn(1, 4, 4, 8)
    assert costs.reference_check(_BackendSensitive(), (x,)) == "REF MISMATCH (rel err 5.0e-01)"
    assert costs.reference_check(_BackendSensitive(nan=True), (x,)) == "NON-FINITE output"


def square_support(field: np.ndarray) -> tuple[int, int, int, int, int]:
    ys, xs = np.nonzero(field)
    return int(np.count_nonzero(field)), ys.min(), ys.max(), xs.min(), xs.max()


@pytest.mark.parametrize(
    "query, rows, cols",
    [((6, 7), (4, 8), (5, 9)), ((0, 0), (0, 4), (0, 4)), ((11, 6), (7, 11), (4, 8)), ((5, 11), (3, 7), (7, 11))],
)
def test_neighborhood_receptive_field_is_exactly_the_clamped_window(query, rows, cols):
    m = receptive.structural_copy(na_module(kernel=5, dim=16))
    field = receptive.gradient_receptive_field(m, NA, 12, 16, query)
    count, y0, y1, x0, x1 = square_support(field)
    assert count == 25 and (y0, y1) == rows and (x0, x1) == cols
    projected = receptive.gradient_receptive_field(m, NA, 12, 16, query, exact=False)
    assert np.array_equal(projected > 0, field > 0)


def test_receptive_field_is_the_jacobian_abs_sum():
    m = receptive.structural_copy(na_module(kernel=3, dim=8))
    x = workload.make_inputs(NA, 6, 8, 1)[0]
    jac = torch.autograd.functional.jacobian(lambda t: m(t)[0, 2, 3], x)  # [C_out, 1, 6, 6, C_in]
    expected = jac.abs().sum(dim=(0, 1, 4)).double().numpy()
    field = receptive.gradient_receptive_field(m, NA, 6, 8, (2, 3))
    np.testing.assert_allclose(field, expected, rtol=1e-5, atol=1e-7)


def test_structural_copy_randomises_only_all_zero_parameters():
    m = na_module()
    with torch.no_grad():
        m.proj.weight.zero_()
    twin = receptive.structural_copy(m)
    assert twin.proj.weight.abs().sum() > 0 and m.proj.weight.abs().sum() == 0
    torch.testing.assert_close(twin.qkv.weight, m.qkv.weight)


def test_attention_maps_of_neighborhood_are_the_window_softmax():
    m = na_module(kernel=3)
    (amap,) = receptive.attention_maps(m, workload.make_inputs(NA, 8, 16, 1), 8, (0, 4))
    assert amap.on_canvas and amap.query == (0, 4)
    assert amap.weights.sum() == pytest.approx(1.0, abs=1e-5)
    ys, xs = np.nonzero(amap.weights)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 2, 3, 5)


def test_output_token_index_maps_layouts():
    assert workload.output_token_index((8, 8), (1, 8, 8, 4), (2, 3)) == (2, 3)
    assert workload.output_token_index((64,), (1, 64, 4), (2, 3)) == (19,)
    assert workload.output_token_index((64,), (1, 1, 4), (2, 3)) == (0,)
    assert workload.output_token_index((8, 8), (1, 4, 4, 4), (5, 3)) == (2, 1)


def test_prepare_falls_back_to_the_registry_test_config_or_says_why():
    prepared = workload.prepare("neighborhood", 5, 16)  # kernel 7 does not fit 5×5; the test config's 3 does
    assert prepared.kwargs == {"kernel_size": NA.test_kwargs["kernel_size"]} and "test config" in prepared.note
    with pytest.raises(workload.PrepareError, match="2×2"):
        workload.prepare("neighborhood", 2, 16)


def test_prepare_gives_every_attention_mechanism_the_same_head_width():
    for name in ("window", "mhsa", "multi_axis"):
        prepared = workload.prepare(name, 8, 64, head_dim=16)
        assert prepared.kwargs.get("head_dim") == 16 and prepared.module.head_dim == 16, name
        assert prepared.module.num_heads == 4, name  # inner width stays dim
    assert "head_dim" not in workload.prepare("squeeze_excite", 8, 64, head_dim=16).kwargs  # not attention
    assert "head_dim" not in workload.prepare("window", 8, 64).kwargs  # None: registry defaults


def test_bench_row_and_report_files(tmp_path):
    cfg = BenchConfig(size=8, dim=16, batch=1, threads=1, sizes=(8, 16), min_run_time=0.01, sweep_min_run_time=0.01)
    row = bench_mechanism("neighborhood", cfg)
    assert row.ok and row.check == "ref ok" and row.error == ""
    assert row.params > 0 and row.flops > 0 and row.peak_bytes > 0 and row.latency_s > 0
    assert row.throughput == pytest.approx(1 / row.latency_s)
    assert row.receptive_field_tokens == 49 and [p.size for p in row.scaling] == [8, 16]
    assert row.memory_exponent == pytest.approx(1.0, abs=0.1)
    broken = BenchRow("broken_one", error="RuntimeError: no", scaling=[ScalingPoint(8, 64, error="x")])
    paths = write_report([row, broken], cfg, tmp_path)
    assert {p.name for p in paths} >= {"bench.csv", "bench.json", "index.html", "latency_vs_tokens.png"}
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in data["results"]] == ["neighborhood", "broken_one"]
    assert data["results"][1]["ok"] is False and data["results"][1]["latency_s"] is None
    html = (tmp_path / "index.html").read_text()
    assert "broken_one" in html and "RuntimeError: no" in html and 'src="memory_vs_tokens.png"' in html


RSS_AFTER_FREE = """
import os, sys, torch
from attnzoo.tools.costs import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator().startswith("glibc"), "not glibc"
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = rss()
x = torch.ones(4 << 20)  # 16 MiB, every page touched
del x
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_steady_allocator_keeps_freed_blocks_in_the_process():
    """With glibc's default a freed 16 MiB block goes back to the kernel (the next one page-faults in again); after
    steady_allocator it stays in the process."""
    kept = {}
    for mode in ("default", "steady"):
        run = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True)
        if "not glibc" in run.stderr:
            pytest.skip("the C library is not glibc")
        assert run.returncode == 0, run.stderr
        kept[mode] = int(run.stdout.split()[-1])
    assert kept["default"] < 4 << 20, kept
    assert kept["steady"] >= 15 << 20, kept
