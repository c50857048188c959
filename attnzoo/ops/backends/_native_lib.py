"""Build (once, cached) and load the fused CPU kernel in ``csrc/neighborhood.cpp``.

The kernel has a plain C ABI and no torch headers, so the system C++ compiler builds it in about a second; the
shared object is cached under ``$ATTNZOO_CACHE`` (default ``~/.cache/attnzoo``) keyed by a hash of the source,
the compiler and its flags. ``ATTNZOO_NATIVE=0`` disables it (the ``tiled`` backend then serves CPU calls).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "neighborhood.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-ffast-math", "-fno-finite-math-only", "-pthread"]


class NativeUnavailable(RuntimeError):
    """The fused CPU kernel could not be built or loaded; the message says why."""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _arch_flags(cxx: str) -> list[str]:
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        probe = subprocess.run([cxx, "-march=native", "-E", "-x", "c++", "-"], input=b"", capture_output=True)
        if probe.returncode == 0:
            return ["-march=native"]
    return []


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The loaded kernel library, building it on first use; raises ``NativeUnavailable`` with the reason."""
    if os.environ.get("ATTNZOO_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by ATTNZOO_NATIVE=0")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (install g++ or set CXX)")
    flags = FLAGS + _arch_flags(cxx)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((cxx, flags, version, platform.node())).encode()).hexdigest()
    cache = Path(os.environ.get("ATTNZOO_CACHE", Path.home() / ".cache" / "attnzoo"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"neighborhood-{digest[:16]}.so"
    if not target.exists():
        with open(cache / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    built = Path(tmp) / target.name
                    result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
                    if result.returncode != 0:
                        raise NativeUnavailable(f"building {SOURCE.name} failed: {result.stderr.strip()[-500:]}")
                    os.replace(built, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # pragma: no cover - depends on the platform
        raise NativeUnavailable(f"loading {target} failed: {exc}") from exc
    p, i64, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"attnzoo_na_forward_{suffix}")
        fwd.argtypes = [p] * 9 + [p] * 4 + [i64] * 5 + [dbl, i64]
        fwd.restype = None
        bwd = getattr(lib, f"attnzoo_na_backward_{suffix}")
        bwd.argtypes = [p] * 18 + [p] * 4 + [i64] * 5 + [dbl, i64]
        bwd.restype = None
    return lib


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the kernel cannot be used (``None`` when it can); constant for the process, so traced as a constant."""
    try:
        load()
    except NativeUnavailable as exc:
        return str(exc)
    return None
