"""The ``flex`` (torch FlexAttention) and ``natten`` backends against the dense reference, the exactness of flex's
block mask, its compile cache, and ``auto``'s order per device.

On CPU torch's FlexAttention is forward-only and its compiled kernel has no logsumexp, so the sweep (every geometry
of tests/ops/test_backends.py, with return_lse, rel_pos_bias, key_bias with dropped keys, additional keys) runs
torch's unfused FlexAttention on the same block mask and score_mod; two tests compile the kernel (the slow part of
this file). On a GPU (ATTNZOO_TEST_DEVICE=cuda) the same sweep runs the compiled kernels, forward and backward run in
tests/ops/test_backends.py.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS, auto_order, select_backend
from attnzoo.ops.backends.flex import BLOCK_SIZE, flex_plan
from attnzoo.ops.geometry import neighborhood_mask
from attnzoo.ops.problem import NAProblem, make_problem

from backend_sweep import CASES, Case, assert_close_rms, assert_lse_close, make_inputs, problem_of, run
from conftest import DEVICE, cpu_only, cuda_only

pytestmark = pytest.mark.filterwarnings("ignore")

# forward variants: "lse" (plain q/k/v), "additional" (extra keys only: natten takes those), and the two with every
# extra (rel_pos_bias, key_bias with dropped keys or broadcast, additional keys). On CPU each new shape costs torch's
# unfused FlexAttention a dynamo trace (seconds), so the sweep takes a covering subset of the engine's geometries:
# 1/2/3-D, stride, dilation with extents not divisible by it, mixed causal axes, head_dim_v != head_dim, batch/heads.
SWEEP_CASES = [CASES[i] for i in (0, 3, 4, 9, 12, 16, 17, 19)]
PARAMS = [(case, "flex", "extras") for case in SWEEP_CASES]
PARAMS += [(CASES[i], "flex", variant) for i in (9, 19) for variant in ("lse", "extras_broadcast_bias")]
PARAMS += [(CASES[i], "natten", "lse") for i in (0, 3, 9, 12, 17)]
PARAMS += [(CASES[i], "natten", "additional") for i in (4, 9)]


def forward_inputs(case: Case, variant: str) -> dict:
    inputs = make_inputs(case, "extras" if variant == "additional" else variant, torch.float32)
    if variant == "additional":
        for name in ("rel_pos_bias", "key_bias"):
            del inputs["tensors"][name]
    return inputs


@pytest.mark.parametrize("case,backend,variant", PARAMS, ids=[f"{c.id}-{b}-{v}" for c, b, v in PARAMS])
def test_forward_matches_reference(case, backend, variant):
    inputs = forward_inputs(case, variant)
    reasons = BACKENDS[backend].not_supported_reasons(problem_of(case, inputs))
    if reasons:
        with pytest.raises(ValueError, match=backend):
            run(case, backend, inputs, grads=False)
        pytest.skip("; ".join(reasons))
    with torch.no_grad():
        out, lse, _ = run(case, backend, inputs, grads=False)
        ref = {"tensors": {n: x.double() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
        ref_out, ref_lse, _ = run(case, "reference", ref, grads=False)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close_rms(out, ref_out, 1e-5, f"{backend} output")
    assert_lse_close(lse, ref_lse, 1e-5, f"{backend} lse")


def test_flex_runs_most_of_the_sweep():
    """flex takes every geometry and variant of the engine's sweep in float32 forward (none is skipped)."""
    for case in CASES:
        for variant in ("lse", "additional", "extras", "extras_broadcast_bias"):
            assert BACKENDS["flex"].not_supported_reasons(problem_of(case, forward_inputs(case, variant))) == []


BLOCK_CASES = [
    Case((20, 17), (3, 5), batch=2, heads=2),  # several blocks, canvas padded to whole tiles
    Case((37,), 5, stride=2, dilation=3),  # 1-D, dilation groups of unequal length
    Case((9, 30), (3, 4), stride=(2, 1), dilation=(2, 3), causal=(False, True)),
    Case((6, 12, 10), (2, 3, 5), dilation=(1, 2, 1), causal=(True, False, False)),
    Case((24, 24), 7),
]


@pytest.mark.parametrize("n_add", [0, 3])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.id for c in BLOCK_CASES])
def test_block_mask_is_exact(case, n_add):
    """Against the dense neighborhood mask over reordered tokens: every allowed pair lies in a computed block, every
    computed block holds one, full blocks hold only allowed pairs, and mask_mod is the mask itself."""
    q = torch.zeros(case.batch, *case.spatial, case.heads, case.dim)
    extra = torch.zeros(case.batch, n_add, case.heads, case.dim) if n_add else None
    plan = flex_plan(make_problem(q, q, q, case.kernel, case.stride, case.dilation, case.causal, extra, extra))
    n = q[0, ..., 0, 0].numel()
    assert torch.equal(plan.source[plan.inverse].cpu(), torch.arange(n)), "the reordering is a permutation"
    real = plan.source.cpu() < n  # padding slots hold source index n
    dense = neighborhood_mask(case.spatial, case.kernel, case.stride, case.dilation, case.causal)
    src = plan.source.cpu().clamp(max=n - 1)
    allowed = dense[src][:, src] & real[:, None] & real[None, :]
    allowed = torch.cat([allowed, real[:, None].expand(-1, n_add)], dim=1)  # additional keys: every real query
    q_idx = torch.arange(plan.n_pad)[:, None]
    kv_idx = torch.arange(plan.kv_len)[None, :]
    tables_mask = plan.mask_mod(None, None, q_idx.to(plan.source.device), kv_idx.to(plan.source.device)).cpu()
    assert torch.equal(tables_mask, allowed), "mask_mod differs from the dense neighborhood mask"

    nq, nk = -(-plan.n_pad // BLOCK_SIZE), -(-plan.kv_len // BLOCK_SIZE)
    padded = torch.zeros(nq * BLOCK_SIZE, nk * BLOCK_SIZE, dtype=torch.bool)
    padded[: plan.n_pad, : plan.kv_len] = allowed
    per_block = padded.reshape(nq, BLOCK_SIZE, nk, BLOCK_SIZE).sum((1, 3))
    computed = plan.block_mask.to_dense()[0, 0].bool().cpu()
    assert torch.equal(computed, per_block > 0), "computed blocks are exactly the blocks with an allowed pair"
    bm = plan.block_mask
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        full[i, bm.full_kv_indices[0, 0, i, : bm.full_kv_num_blocks[0, 0, i]].long().cpu()] = True
    assert torch.all(per_block[full] == BLOCK_SIZE * BLOCK_SIZE), "a full block must hold only allowed pairs"
    stats = plan.stats
    assert stats["computed_blocks"] == int(computed.sum()) and stats["fully_masked_fraction"] == 0.0
    assert 0 <= stats["masked_pair_fraction"] < 1 and 0 <= stats["padding_fraction"] < 1


def test_plan_picks_the_order_with_fewer_blocks():
    """48×48, kernel 13: tiles of 8×16 tokens compute fewer blocks than row-major order, which the backend then runs;
    24×24, kernel 7: a block spans whole rows, row-major computes fewer and is picked."""
    for side, kernel, order in ((48, 13, "tiles"), (24, 7, "row-major")):
        q = torch.zeros(1, side, side, 1, 8)
        problem = make_problem(q, q, q, kernel)
        tiles, rows, chosen = flex_plan(problem, True), flex_plan(problem, False), flex_plan(problem)
        assert tiles.stats["tile_shape"] == (8, 16)
        assert chosen.stats["order"] == order, (tiles.stats, rows.stats)
        assert chosen.stats["computed_blocks"] == min(tiles.stats["computed_blocks"], rows.stats["computed_blocks"])


@cpu_only
def test_flex_declines_backward_on_cpu():
    q = torch.randn(1, 6, 6, 2, 16, requires_grad=True)
    reasons = BACKENDS["flex"].not_supported_reasons(make_problem(q, q, q, 3))
    assert any("backward on CPU" in r for r in reasons), reasons
    with pytest.raises(ValueError, match="backward on CPU"):
        ops.na2d(q, q, q, 3, backend="flex")
    with torch.no_grad():
        assert BACKENDS["flex"].not_supported_reasons(make_problem(q, q, q, 3)) == []
    assert BACKENDS["flex"].not_supported_reasons(make_problem(q.double(), q.double(), q.double(), 3))


def test_natten_declines_what_it_lacks():
    pytest.importorskip("natten.functional")
    q = torch.randn(1, 6, 6, 2, 8, device=DEVICE)
    rpb, kb = torch.zeros(2, 5, 5, device=DEVICE), torch.zeros(1, 6, 6, 2, device=DEVICE)
    reasons = BACKENDS["natten"].not_supported_reasons(make_problem(q, q, q, 3, rel_pos_bias=rpb, key_bias=kb))
    assert any("rel_pos_bias" in r for r in reasons) and any("key_bias" in r for r in reasons), reasons
    odd = torch.randn(1, 6, 6, 2, 12, device=DEVICE)  # head_dim 12: natten's CPU (Flex) path needs a power of two
    if DEVICE.type == "cpu":
        assert BACKENDS["natten"].not_supported_reasons(make_problem(odd, odd, odd, 3)), "natten took head_dim 12"
        with pytest.raises(ValueError, match="natten"):
            ops.na2d(odd, odd, odd, 3, backend="natten")


def test_auto_order_per_device():
    """CPU keeps native first; CUDA tries natten, then flex, then partition, then tiled (checked on problems that
    only describe a CUDA call, so this runs without a GPU)."""
    assert auto_order("cpu")[0] == "native"
    assert auto_order("cuda") == ("natten", "flex", "partition", "tiled", "reference")

    def cuda_problem(**kw) -> NAProblem:
        base = dict(
            batch=1,
            spatial_shape=(8, 8),
            heads=2,
            head_dim=32,
            head_dim_v=32,
            kernel_size=(4, 4),
            stride=(1, 1),
            dilation=(1, 1),
            is_causal=(False, False),
            dtype=torch.float32,
            device=torch.device("cuda"),
        )
        return NAProblem(**{**base, **kw})

    assert select_backend("auto", cuda_problem(has_rel_pos_bias=True)).name == "flex"  # natten has no rpb
    assert select_backend("auto", cuda_problem(dtype=torch.float64)).name == "tiled"
    assert select_backend("auto", cuda_problem(dtype=torch.float64, stride=(4, 4))).name == "partition"


def test_all_keys_dropped():
    """key_bias = -inf over a whole window: output 0 and lse -inf, as the reference."""
    q, k, v = (torch.randn(1, 6, 1, 16, device=DEVICE) for _ in range(3))
    kb = torch.zeros(1, 6, 1, device=DEVICE)
    kb[0, :3] = float("-inf")
    with torch.no_grad():
        out, lse = ops.na1d(q, k, v, 3, key_bias=kb, return_lse=True, backend="flex")
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])) and torch.isneginf(lse[0, :2]).all()
    torch.testing.assert_close(out[0, 2], v[0, 3], rtol=0, atol=1e-6)


def test_compiled_kernel_matches_reference_and_does_not_recompile():
    """The compiled path (no lse) with every extra, twice with fresh tensors: one compiled graph, exact results."""
    from torch._dynamo.utils import counters

    case = Case((12, 13), (3, 5), stride=(2, 1), dilation=(2, 1), causal=(False, True), batch=2, heads=2, dim=16)
    graphs = []
    for seed in (0, 1):
        inputs = make_inputs(case, "extras", torch.float32, seed=seed)
        inputs["kwargs"]["return_lse"] = False
        with torch.no_grad():
            out, _, _ = run(case, "flex", inputs, grads=False)
            ref = {"tensors": {n: x.double() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
            ref_out, _, _ = run(case, "reference", ref, grads=False)
        assert_close_rms(out, ref_out, 1e-5, f"compiled flex output (seed {seed})")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], "a second call of the same geometry recompiled"


@cuda_only  # on CPU the unfused path covers half inputs (tests/ops/test_backends.py::test_half_precision_forward)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_compiled_half_precision(dtype):
    """Compiled kernel on half inputs (float32 softmax statistics inside): close to the float32 reference."""
    case = Case((16, 10), 5, dilation=(1, 2), heads=2, dim=16)
    inputs = make_inputs(case, "plain", dtype)
    with torch.no_grad():
        out, _, _ = run(case, "flex", inputs, grads=False)
        ref = {"tensors": {n: x.float() for n, x in inputs["tensors"].items()}, "kwargs": inputs["kwargs"]}
        ref_out, _, _ = run(case, "reference", ref, grads=False)
    assert out.dtype == dtype
    assert_close_rms(out.float(), ref_out, 1e-2 if dtype == torch.bfloat16 else 2e-3, f"{dtype} output")
