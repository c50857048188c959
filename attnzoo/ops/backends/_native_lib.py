"""Build (once, cached) and load the fused CPU kernel in ``csrc/neighborhood.cpp``.

The kernel has a plain C ABI and no torch headers, so the system C++ compiler builds it (about fifteen seconds,
once); the shared object is cached under ``$ATTNZOO_CACHE`` (default ``~/.cache/attnzoo``, private to the user)
keyed by a hash of the source, the compiler and its flags, the host and the CPU (it is built with
``-march=native``), and verified against a SHA-256 side file before every load.
``ATTNZOO_NATIVE=0`` disables it (the ``tiled`` backend then serves CPU calls).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "neighborhood.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffast-math", "-fno-finite-math-only", "-pthread"]


class NativeUnavailable(RuntimeError):
    """The fused CPU kernel could not be built or loaded; the message says why."""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def torch_uses_libgomp() -> bool:
    """Whether this process runs PyTorch's parallel ops on GNU OpenMP (``libgomp.so.1`` is loaded), as the Linux
    wheels do. The kernel then links the same runtime (the loader reuses the loaded ``libgomp.so.1``) and runs on
    torch's own OpenMP threads: separate threads would compete for the cores with torch's, which keep spinning after
    every parallel op (measured on 2 cores: forward+backward of workload P 1.3-1.5x faster on torch's threads)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps


def _threading_flags() -> list[str]:
    """``-fopenmp`` where the kernel can share torch's OpenMP runtime, else ``std::thread`` workers (no second
    OpenMP runtime next to another one, e.g. Intel's or LLVM's)."""
    return ["-fopenmp"] if torch_uses_libgomp() else ["-fopenmp-simd"]


def _arch_flags(cxx: str) -> list[str]:
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        probe = subprocess.run([cxx, "-march=native", "-E", "-x", "c++", "-"], input=b"", capture_output=True)
        if probe.returncode == 0:
            return ["-march=native"]
    return []


def cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU model and feature flags (``/proc/cpuinfo`` on Linux, else the
    platform's processor string). Part of the library's cache key, so a cache shared between machines (a network
    home directory, a copied container) never hands one CPU a library built for another's instruction set."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


SYMBOLS = tuple(f"attnzoo_na_{op}_{suffix}" for op in ("forward", "backward") for suffix in ("f32", "f64"))


def cache_dir() -> Path:
    """``$ATTNZOO_CACHE`` or ``~/.cache/attnzoo``, created private (0700); refused unless it is a real directory
    owned by this user and not writable by group or others (anyone who can write there could plant a library)."""
    cache = Path(os.environ.get("ATTNZOO_CACHE") or Path.home() / ".cache" / "attnzoo")
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(cache)
    if not stat.S_ISDIR(st.st_mode):
        raise NativeUnavailable(f"cache {cache} is not a directory (a symlink or file is in the way)")
    if st.st_uid != os.getuid():
        raise NativeUnavailable(f"cache {cache} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise NativeUnavailable(
            f"cache {cache} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
        )
    return cache


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """True when ``target`` is a regular file of ours, not writable by others, whose bytes match the SHA-256 side
    file written after it was built (a corrupt, truncated, replaced or planted library does not verify)."""
    digest_file = target.with_name(target.name + ".sha256")
    try:
        for path in (target, digest_file):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
        return digest_file.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _build(cxx: str, flags: list[str], cache: Path, target: Path) -> None:
    """Compile into a private temporary folder, then move the library and its SHA-256 side file into place."""
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} failed: {result.stderr.strip()[-500:]}")
        os.chmod(built, 0o700)
        digest = Path(tmp) / (target.name + ".sha256")
        digest.write_text(_sha256(built) + "\n")
        os.replace(built, target)  # the library first: a library without a matching side file is rebuilt
        os.replace(digest, target.with_name(digest.name))


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The loaded kernel library, building it on first use; raises ``NativeUnavailable`` with the reason.

    The library is named by a hash of the source, compiler and flags, and is loaded only after its bytes match
    the SHA-256 recorded when it was built (else it is rebuilt); it must export every kernel symbol.
    """
    if os.environ.get("ATTNZOO_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by ATTNZOO_NATIVE=0")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (install g++ or set CXX)")
    flags = FLAGS + _threading_flags() + _arch_flags(cxx)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = repr((cxx, flags, version, platform.node(), cpu_identity())).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()
    try:
        cache = cache_dir()
    except OSError as exc:
        raise NativeUnavailable(f"cannot create the kernel cache: {exc}") from None
    target = cache / f"neighborhood-{digest[:16]}.so"
    if not _verified(target):
        with open(cache / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _verified(target):
                _build(cxx, flags, cache, target)
    if not _verified(target):
        raise NativeUnavailable(f"{target} does not match its SHA-256 right after building it")
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # pragma: no cover - depends on the platform
        raise NativeUnavailable(f"loading {target} failed: {exc}") from exc
    missing = [name for name in SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise NativeUnavailable(f"{target} lacks the symbols {', '.join(missing)}")
    p, i64, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"attnzoo_na_forward_{suffix}")
        fwd.argtypes = [p] * 10 + [p] * 5 + [i64] * 5 + [dbl, i64]
        fwd.restype = None
        bwd = getattr(lib, f"attnzoo_na_backward_{suffix}")
        bwd.argtypes = [p] * 19 + [p] * 5 + [i64] * 5 + [dbl, i64]
        bwd.restype = None
    return lib


_warned: set[str] = set()


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the kernel cannot be used (``None`` when it can); constant for the process, so traced as a constant.
    The first time a reason comes up it is also given as one ``RuntimeWarning`` (not for ``ATTNZOO_NATIVE=0``)."""
    try:
        load()
    except NativeUnavailable as exc:
        reason = str(exc)
        if reason not in _warned and not reason.startswith("disabled by"):
            _warned.add(reason)
            warnings.warn(
                f"attnzoo: the fused CPU kernel is unavailable ({reason}); CPU calls use the slower 'tiled' backend",
                RuntimeWarning,
                stacklevel=2,
            )
        return reason
    return None
