"""Per-machine calibration of ``backend="auto"``: opt-in, as ``torch.backends.cudnn.benchmark`` is.

With calibration on (``set_auto_calibration(True)`` or ``ATTNZOO_AUTO_CALIBRATION=1``), the first ``auto`` call of a
problem that more than one fast backend can run times each of them on that call's own inputs (forward, or forward
and backward when autograd will differentiate the call; one warm-up round, then ``ROUNDS`` interleaved rounds) and
keeps the fastest by median time. The choice is kept per problem signature and thread count in memory and in
``auto-<machine>.json`` under the kernel cache (``$ATTNZOO_CACHE`` or ``~/.cache/attnzoo``), so later processes on
the same machine reuse it without timing. Off by default: the fixed rule of ``auto_choice`` keeps runs reproducible
and costs nothing on a problem's first call. ``explain`` says which applies and shows the measured times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..problem import NAProblem
from ._native_lib import cache_dir, cpu_identity
from .base import Backend

__all__ = ["ENV", "ROUNDS", "FAST_BACKENDS", "set_auto_calibration", "calibration_enabled", "candidates", "lookup",
           "calibrate", "forget"]  # fmt: skip

ENV = "ATTNZOO_AUTO_CALIBRATION"
ROUNDS = 3
# Per device type, the backends worth timing; the portable fallbacks (tiled, reference) are never faster.
FAST_BACKENDS = {"cpu": ("native", "partition"), "cuda": ("natten", "flex", "partition")}

_setting: bool | None = None  # None: the environment decides
_choices: dict[str, dict] | None = None  # signature -> {"backend": name, "ms": {name: median ms}}


def set_auto_calibration(enabled: bool) -> None:
    """Turn per-machine calibration of ``backend="auto"`` on or off for this process (overrides ``$ATTNZOO_AUTO_CALIBRATION``)."""
    global _setting
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r} must be a bool")
    _setting = enabled


def calibration_enabled() -> bool:
    """Whether ``auto`` calibrates: the last ``set_auto_calibration``, else ``$ATTNZOO_AUTO_CALIBRATION`` (0 or 1)."""
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r} must be '0' (the fixed rule) or '1' (calibrate per machine)")
    return value == "1"


def candidates(problem: NAProblem, backends: dict[str, Backend]) -> list[Backend]:
    """The fast backends of the problem's device that can run it (calibration applies when there are two or more)."""
    names = FAST_BACKENDS.get(problem.device.type, ())
    return [backends[n] for n in names if not backends[n].not_supported_reasons(problem)]


def signature(problem: NAProblem) -> str:
    """What a choice is kept under: the problem (device type, not index), the thread count, the torch version."""
    device = problem.device.type
    if device == "cuda":
        device = torch.cuda.get_device_name(problem.device)
    described = dataclasses.replace(problem, device=torch.device(problem.device.type))
    return f"{device}|threads={torch.get_num_threads()}|torch={torch.__version__}|{described!r}"


def lookup(problem: NAProblem, options: list[Backend]) -> dict | None:
    """The kept choice for ``problem`` (``{"backend": name, "ms": {name: ms}}``), or None if it was not calibrated yet
    or its backend is not among ``options`` (e.g. a backend that was installed when it was timed, and is not now)."""
    kept = _load().get(signature(problem))
    return kept if kept is not None and kept["backend"] in {b.name for b in options} else None


def calibrate(problem: NAProblem, options: list[Backend], trial: Callable[[Backend], None]) -> dict:
    """Time ``trial(backend)`` for every option (a warm-up round, then ``ROUNDS`` interleaved rounds), keep and return
    the choice. ``trial`` runs the call on that backend as it will run (with its backward when training)."""
    sync = torch.cuda.synchronize if problem.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {b.name: [] for b in options}
    for round_ in range(ROUNDS + 1):
        for backend in options:
            sync()
            start = time.perf_counter()
            trial(backend)
            sync()
            if round_:  # round 0 warms up (a kernel build, a compilation, first-touch allocations)
                times[backend.name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    choice = {"backend": min(ms, key=ms.get), "ms": ms}
    _load()[signature(problem)] = choice
    _save(signature(problem), choice)
    return choice


def forget() -> None:
    """Drop the in-memory choices (the next lookup reads the machine's file again)."""
    global _choices
    _choices = None


def _path() -> Path:
    machine = hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"auto-{machine}.json"


def _load() -> dict[str, dict]:
    global _choices
    if _choices is None:
        try:
            _choices = json.loads(_path().read_text())
        except (OSError, RuntimeError, ValueError):  # no file yet, an unusable cache, a damaged file: start empty
            _choices = {}
    return _choices


def _save(key: str, choice: dict) -> None:
    """Merge one choice into the machine's file (written to a temporary file, then moved into place)."""
    try:
        path = _path()
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = {}
        kept[key] = choice
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(kept, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except (OSError, RuntimeError):  # an unusable cache: the choice stays in memory for this process
        pass
