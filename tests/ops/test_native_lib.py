"""What we load (issue 18, item 14): the native kernel library is built into a private cache, named by a hash of its
source and flags, verified against the SHA-256 recorded at build time before it is loaded, rebuilt when it does not
verify, checked for its symbols, and its absence is reported once as a warning."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import _native_lib

PLANT = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
  if (const char* p = std::getenv("ATTNZOO_PLANT_MARKER")) { FILE* f = std::fopen(p, "w"); if (f) std::fclose(f); }
}
extern "C" int unrelated() { return 1; }
"""


CHECK = """
import json, warnings
import torch
import attnzoo.ops as ops
from attnzoo.ops.backends import _native_lib
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reason = _native_lib.unavailable_reason()
q = torch.randn(1, 8, 1, 4, dtype=torch.float64)
ok = torch.allclose(ops.na1d(q, q, q, 3), ops.na1d(q, q, q, 3, backend="reference"))
print(json.dumps({"reason": reason, "ok": ok, "warnings": [str(w.message) for w in caught]}))
"""


def _check(cache: Path, **env) -> dict:
    """Load the kernel in a fresh process (a library already mapped into this one cannot be swapped safely)."""
    import json
    import sys

    environment = {**os.environ, "ATTNZOO_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[2]), **env}
    result = subprocess.run([sys.executable, "-c", CHECK], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("built") / "cache"
    assert _check(cache)["reason"] is None
    return cache


@pytest.fixture
def cache_copy(built_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    return cache


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh ``ATTNZOO_CACHE`` for in-process checks that fail before anything is loaded."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNZOO_CACHE", str(cache))
    _native_lib.load.cache_clear()
    yield cache
    monkeypatch.undo()
    _native_lib.load.cache_clear()
    _native_lib._warned.clear()
    assert _native_lib.unavailable_reason() is None


def _library(cache: Path) -> Path:
    (lib,) = cache.glob("neighborhood-*.so")
    return lib


def _plant(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "plant.cpp"
    source.write_text(PLANT)
    built = tmp_path / "plant.so"
    subprocess.run(["c++", "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    os.replace(built, target)


def test_cache_is_private_and_library_has_a_digest(built_cache):
    import hashlib

    assert built_cache.stat().st_mode & 0o077 == 0
    lib = _library(built_cache)
    assert lib.with_name(lib.name + ".sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


def test_planted_library_is_never_loaded(cache_copy, tmp_path):
    marker = tmp_path / "constructor-ran"
    _plant(tmp_path, _library(cache_copy))  # same name, foreign bytes: the recorded SHA-256 no longer matches
    result = _check(cache_copy, ATTNZOO_PLANT_MARKER=str(marker))
    assert not marker.exists(), "a planted library's constructor ran"
    assert result["reason"] is None and result["ok"] and result["warnings"] == []


def test_library_without_side_file_is_rebuilt(cache_copy, tmp_path):
    marker = tmp_path / "constructor-ran"
    lib = _library(cache_copy)
    lib.with_name(lib.name + ".sha256").unlink()
    _plant(tmp_path, lib)
    result = _check(cache_copy, ATTNZOO_PLANT_MARKER=str(marker))
    assert not marker.exists()
    assert result["reason"] is None and result["ok"]


def test_corrupt_library_is_rebuilt_not_abandoned(cache_copy):
    lib = _library(cache_copy)
    lib.write_bytes(lib.read_bytes()[:1000])  # truncated
    result = _check(cache_copy)
    assert result["reason"] is None and result["ok"] and result["warnings"] == []


def test_library_without_symbols_is_refused_with_the_reason(cache_copy, tmp_path):
    import hashlib

    lib = _library(cache_copy)
    _plant(tmp_path, lib)
    # A library whose side file matches (written by this user) but which lacks the kernel: refused by name with
    # one warning, never an AttributeError from every call; auto falls back and still computes the right thing.
    lib.with_name(lib.name + ".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    result = _check(cache_copy)
    assert "lacks the symbols attnzoo_na_forward_f32" in result["reason"]
    assert result["ok"]
    assert len(result["warnings"]) == 1 and "fused CPU kernel is unavailable" in result["warnings"][0]


def test_cache_writable_by_others_is_refused_once_with_a_warning(private_cache):
    private_cache.mkdir(mode=0o700)
    os.chmod(private_cache, 0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others") as record:
        reason = _native_lib.unavailable_reason()
        _native_lib.unavailable_reason()
    assert "chmod 700" in reason
    assert len([w for w in record if "fused CPU kernel" in str(w.message)]) == 1
    assert not list(private_cache.glob("*.so"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = torch.randn(1, 8, 1, 4)
        ops.na1d(q, q, q, 3)  # falls back silently after the one warning


def test_cache_that_is_a_symlink_is_refused(private_cache, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    private_cache.symlink_to(real)
    with pytest.warns(RuntimeWarning, match="not a directory"):
        assert "not a directory" in _native_lib.unavailable_reason()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the cache to another user")
def test_cache_owned_by_another_user_is_refused(private_cache):
    private_cache.mkdir(mode=0o700)
    os.chown(private_cache, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="owned by uid 65534"):
        assert "owned by uid 65534" in _native_lib.unavailable_reason()


def test_library_built_for_another_cpu_is_not_loaded(private_cache, monkeypatch):
    """The library is compiled with -march=native: the CPU's model and flags are part of its cache key, so a cache
    shared with a machine of another CPU builds a library of its own instead of loading the other's."""
    _native_lib.load()
    monkeypatch.setattr(_native_lib, "cpu_identity", lambda: "model name : another CPU\nflags : sse2")
    _native_lib.load.cache_clear()
    _native_lib.load()
    assert len(list(private_cache.glob("neighborhood-*.so"))) == 2


THREADED = """
import json, torch
import attnzoo.ops as ops
from attnzoo.ops.backends import _native_lib
_native_lib.torch_uses_libgomp = lambda: False  # as under a PyTorch built on another OpenMP runtime
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 20, 37, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = {b: ops.na2d(q, k, v, 7, backend=b) for b in ("native", "reference")}
grads = {b: torch.autograd.grad(o.sum(), (q, k, v)) for b, o in out.items()}
error = max((a - b).abs().max().item() for a, b in zip((out["native"], *grads["native"]), (out["reference"], *grads["reference"])))
maps = open("/proc/self/maps").read()
print(json.dumps({"error": error, "libraries": sorted({l.split()[-1] for l in maps.splitlines() if "gomp" in l})}))
"""


def test_threads_are_torchs_openmp_team_where_torch_runs_on_libgomp(tmp_path):
    """Where PyTorch runs on libgomp, the kernel is built with -fopenmp and shares torch's runtime (one libgomp in
    the process); elsewhere it is built with std::thread workers, which give the same results."""
    import json
    import sys

    if not _native_lib.torch_uses_libgomp():
        pytest.skip("this PyTorch does not run on libgomp")
    assert "-fopenmp" in _native_lib._threading_flags()
    q = torch.randn(1, 8, 1, 4)
    ops.na1d(q, q, q, 3, backend="native")  # the kernel is loaded in this process
    gomp = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
    assert len(gomp) == 1, gomp  # the kernel reuses torch's libgomp: no second runtime
    environment = {**os.environ, "ATTNZOO_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run([sys.executable, "-c", THREADED], env=environment, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] < 1e-10
    assert len(report["libraries"]) == 1  # only torch's runtime there too
