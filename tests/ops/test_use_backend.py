"""The engine-wide backend switch ``ops.use_backend`` and the backend record ``ops.record_backends`` (issue 17):
names are validated, blocks nest and restore, a per-call backend wins, threads and tasks do not see each other's
switch, the dense op runs on every backend that can hold it, and every registered mechanism that calls the engine
runs wholly on the forced backend with the same output (the bench reference check compares instead of "finite")."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.mechanisms import mechanism_info
from attnzoo.tools import costs

from conftest import DEVICE, hand_attention, rand64

NAMES = attnzoo.list_mechanisms()


def backends_of(runs) -> set[str]:
    return {run.backend for run in runs}


def qkv(*shape, seed=0):
    return tuple(rand64(*shape, seed=seed + i) for i in range(3))


# --- the switch itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["Reference", "sdpa", "", "fast"])
def test_use_backend_rejects_unknown_names_before_entering(bad):
    with pytest.raises(ValueError) as info, ops.use_backend(bad):
        pytest.fail("the block must not run")
    message = str(info.value)
    assert f"name={bad!r}" in message and all(repr(b) in message for b in ["auto", *ops.list_backends()])
    assert ops.resolve_backend() == "auto"


@pytest.mark.parametrize("bad", [None, 1, ("tiled",)])
def test_use_backend_rejects_non_strings(bad):
    with pytest.raises(TypeError, match="name="), ops.use_backend(bad):
        pass


def test_blocks_nest_and_restore_also_on_exception():
    assert ops.resolve_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.resolve_backend() == "reference"
        with pytest.raises(RuntimeError, match="boom"), ops.use_backend("tiled"):
            assert ops.resolve_backend() == "tiled"
            raise RuntimeError("boom")
        assert ops.resolve_backend() == "reference"
        with ops.use_backend("auto"):  # "auto" restores automatic dispatch inside an outer block
            assert ops.resolve_backend() == "auto"
        assert ops.resolve_backend() == "reference"
    assert ops.resolve_backend() == "auto"


def test_attnzoo_exports_the_switch():
    assert attnzoo.use_backend is ops.use_backend


def test_switch_forces_neighborhood_calls_and_explain_says_so():
    q, k, v = qkv(1, 7, 6, 2, 4)
    with ops.record_backends() as runs:
        default = ops.neighborhood_attention(q, k, v, 3)
        for name in ("reference", "tiled"):
            with ops.use_backend(name):
                forced = ops.neighborhood_attention(q, k, v, 3)
                assert ops.explain(q, k, v, 3) == f"{name}: forced by attnzoo.ops.use_backend({name!r})"
            torch.testing.assert_close(forced, default, rtol=1e-12, atol=1e-12)
    assert [run.backend for run in runs[1:]] == ["reference", "tiled"]
    assert runs[0].op == "neighborhood" and runs[0].backend == ops.explain(q, k, v, 3).split(":")[0]


def test_per_call_backend_wins_over_the_switch():
    q, k, v = qkv(1, 6, 6, 2, 4)
    with ops.use_backend("reference"), ops.record_backends() as runs:
        ops.neighborhood_attention(q, k, v, 3, backend="tiled")
        ops.neighborhood_attention(q, k, v, 3)
        ops.attention(q, k, v, backend="tiled")
        ops.attention(q, k, v)
        assert ops.explain(q, k, v, 3, backend="tiled") == "tiled: requested by name"
    assert runs == [("neighborhood", "tiled"), ("neighborhood", "reference"), ("attention", "tiled"),
                    ("attention", "reference")]  # fmt: skip


def test_forced_backend_that_cannot_run_raises_the_explicit_error():
    q, k, v = qkv(1, 6, 6, 2, 4)
    with pytest.raises(ValueError) as explicit:
        ops.neighborhood_attention(q, k, v, 3, backend="partition")
    with ops.use_backend("partition"), pytest.raises(ValueError) as forced:
        ops.neighborhood_attention(q, k, v, 3)
    assert str(forced.value).startswith(str(explicit.value))
    assert "use_backend('partition')" in str(forced.value)
    short_k, short_v = k[:, :3], v[:, :3]
    with ops.use_backend("tiled"), pytest.raises(ValueError, match="backend='tiled' cannot run this attention call"):
        ops.attention(q, short_k, short_v)
    with pytest.raises(ValueError, match="backend='tiled' cannot run .* attn_mask"):
        ops.attention(q, k, v, attn_mask=torch.ones(36, 36, dtype=torch.bool), backend="tiled")
    with pytest.raises(ValueError, match="backend='fast'"):
        ops.attention(q, k, v, backend="fast")


def test_record_backends_nests_into_one_list_and_records_nothing_outside():
    q, k, v = qkv(1, 6, 2, 4)
    with ops.record_backends() as outer:
        ops.attention(q, k, v)
        with ops.record_backends() as inner:
            ops.attention(q, k, v, backend="reference")
        assert inner is outer
    ops.attention(q, k, v)
    assert outer == [("attention", "sdpa"), ("attention", "reference")]


def test_threads_do_not_see_each_others_switch_or_record():
    q, k, v = qkv(1, 8, 2, 4)
    barrier = threading.Barrier(2)
    seen: dict[str, object] = {}

    def worker(name: str) -> None:
        with ops.use_backend(name), ops.record_backends() as runs:
            barrier.wait()  # both blocks are open at once
            for _ in range(5):
                ops.neighborhood_attention(q, k, v, 3)
            barrier.wait()
        seen[name] = runs

    with ops.use_backend("partition"):  # a thread starts from a fresh context, not this one
        observed = []
        probe = threading.Thread(target=lambda: observed.append(ops.resolve_backend()))
        probe.start()
        probe.join()
        threads = [threading.Thread(target=worker, args=(name,)) for name in ("reference", "tiled")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert observed == ["auto"]
    assert seen["reference"] == [("neighborhood", "reference")] * 5
    assert seen["tiled"] == [("neighborhood", "tiled")] * 5


def test_asyncio_tasks_keep_their_own_switch():
    q, k, v = qkv(1, 8, 2, 4)

    async def run(name: str) -> list:
        with ops.use_backend(name), ops.record_backends() as runs:
            await asyncio.sleep(0)  # let the other task enter its block
            ops.neighborhood_attention(q, k, v, 3)
            await asyncio.sleep(0)
            ops.neighborhood_attention(q, k, v, 3)
        return runs

    async def main() -> list:
        return await asyncio.gather(run("reference"), run("tiled"))

    reference, tiled = asyncio.run(main())
    assert backends_of(reference) == {"reference"} and backends_of(tiled) == {"tiled"}
    assert len(reference) == len(tiled) == 2


# --- the dense op on every backend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key_mask", [None, "bool", "float"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_attention_on_every_backend_that_can_run_it_matches_a_hand_oracle(is_causal, key_mask):
    q, k = rand64(2, 3, 4, 2, 5, seed=0), rand64(2, 3, 4, 2, 5, seed=1)
    v = rand64(2, 3, 4, 2, 3, seed=2)  # another head_dim for values
    allowed = torch.ones(12, 12, dtype=torch.bool).tril() if is_causal else torch.ones(12, 12, dtype=torch.bool)
    allowed, bias, attn_mask = allowed.expand(2, 2, 12, 12), None, None
    if key_mask is not None:  # one row for every query: keys 3 and 7 of the first batch item dropped, a bias
        keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
        keep[0, 0, 0, [3, 7]] = False
        bias = rand64(2, 2, 1, 12, seed=4)
        attn_mask = keep if key_mask == "bool" else bias
        allowed = allowed & keep if key_mask == "bool" else allowed
        bias = None if key_mask == "bool" else bias.expand(2, 2, 12, 12)
    expected_out, expected_lse = hand_attention(q, k, v, 0.4, allowed, bias)
    ran = []
    for name in ops.list_backends():
        with ops.use_backend(name), ops.record_backends() as runs:
            try:
                out, lse = ops.attention(q, k, v, scale=0.4, is_causal=is_causal, attn_mask=attn_mask, return_lse=True)
            except ValueError as exc:
                assert f"backend={name!r} cannot run" in str(exc)
                continue
        assert runs == [("attention", name)]
        torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-12)
        ran.append(name)
    assert "reference" in ran and "tiled" in ran


# --- every registered mechanism --------------------------------------------------------------------------------------


def build64(name: str) -> torch.nn.Module:
    info = mechanism_info(name)
    torch.manual_seed(0)
    return attnzoo.create(name, info.test_dim, **info.test_kwargs).eval().to(DEVICE, torch.float64)


def sample64(name: str) -> tuple[torch.Tensor, ...]:
    info = mechanism_info(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *info.test_size, info.test_dim, generator=gen, dtype=torch.float64)
    if info.layout == "cross":
        return (x.to(DEVICE), torch.randn(2, 5, info.test_dim, generator=gen, dtype=torch.float64).to(DEVICE))
    return (x.to(DEVICE),)


def run_forced(module, inputs, name: str):
    with torch.no_grad(), ops.use_backend(name), ops.record_backends() as runs:
        return module(*inputs), runs


@pytest.mark.parametrize("name", NAMES)
def test_every_engine_calling_mechanism_runs_wholly_on_the_forced_backend(name):
    module, inputs = build64(name), sample64(name)
    with torch.no_grad(), ops.record_backends() as runs:
        default = module(*inputs)
    forced, forced_runs = run_forced(module, inputs, "reference")
    if not runs:  # no engine call: the switch has nothing to force, and nothing changes
        assert forced_runs == [] and torch.equal(forced, default)
        return
    assert backends_of(forced_runs) == {"reference"} and len(forced_runs) == len(runs)
    torch.testing.assert_close(forced, default, rtol=1e-10, atol=1e-10)
    refusals = []
    for other in ("tiled", "native", "partition", "flex", "natten"):  # the first other backend that runs it
        try:
            forced, forced_runs = run_forced(module, inputs, other)
        except ValueError as exc:
            assert f"backend={other!r} cannot run" in str(exc)
            refusals.append(str(exc))
            continue
        assert backends_of(forced_runs) == {other} and len(forced_runs) == len(runs)
        torch.testing.assert_close(forced, default, rtol=1e-10, atol=1e-10)
        break
    else:  # only the reference holds it: then tiled (which runs every neighborhood) refused a dense call
        assert "backend='tiled' cannot run this attention call" in refusals[0], refusals


@pytest.mark.parametrize("name", NAMES)
def test_bench_reference_check_compares_every_engine_calling_mechanism(name):
    module, inputs = build64(name), sample64(name)
    with torch.no_grad(), ops.record_backends() as runs:
        module(*inputs)
    assert costs.reference_check(module, inputs) == ("ref ok" if runs else "finite")


@pytest.mark.parametrize(
    "name",
    [
        "neighborhood",
        "mhsa",
        "window",
        "routing",
        "hilo",
        "aggregated",
        "overlapping_cross",
        "long_short_distance",
        "multi_axis",
        "cascaded_group",
    ],  # fmt: skip
)
def test_known_engine_callers_are_recorded(name):
    """The guard of the two tests above: these mechanisms call the engine, so an empty record would be a bug (it is
    what made the bench report "finite" for hilo, aggregated, overlapping_cross and long_short_distance)."""
    with torch.no_grad(), ops.record_backends() as runs:
        build64(name)(*sample64(name))
    assert runs and {run.op for run in runs} <= {"neighborhood", "attention"}


def test_bench_reference_check_refuses_to_compare_a_module_with_an_explicit_backend():
    info = mechanism_info("neighborhood")
    module = attnzoo.create("neighborhood", info.test_dim, **info.test_kwargs, backend="tiled")
    module = module.eval().to(DEVICE, torch.float64)
    check = costs.reference_check(module, sample64("neighborhood"))
    assert check.startswith("REF SKIPPED") and "'tiled'" in check


def test_window_fast_path_yields_to_the_switch():
    """Shifted windows on window-multiple extents take Swin's roll + masked SDPA path by default; under a forced
    backend they run as offset windows on the engine, with the same output."""
    module = attnzoo.create("window", 16, window_size=4, shift_size=2, num_heads=2).eval().to(DEVICE, torch.float64)
    x = rand64(2, 8, 8, 16, seed=3).to(DEVICE)
    with torch.no_grad(), ops.record_backends() as runs:
        default = module(x)
    assert runs == [("attention", "sdpa")]
    for name in ("reference", "tiled"):
        forced, forced_runs = run_forced(module, (x,), name)
        assert forced_runs == [("neighborhood", name)]
        torch.testing.assert_close(forced, default, rtol=1e-10, atol=1e-10)
