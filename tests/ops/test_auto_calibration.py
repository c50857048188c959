"""Per-machine calibration of ``backend="auto"`` (``attnzoo.ops.set_auto_calibration``): off by default; when on,
the first call of a problem times the fast backends that can run it and keeps the fastest, in memory and in the
machine's file under the cache, and ``explain`` shows the measured times."""

from __future__ import annotations

import json
import time

import pytest
import torch

import attnzoo.ops as ops
from attnzoo.ops.backends import BACKENDS, calibration


@pytest.fixture
def calibrating(tmp_path, monkeypatch):
    """Calibration on, with a fresh cache folder and no choices in memory; everything restored afterwards."""
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "_setting", None)
    monkeypatch.setattr(calibration, "_choices", None)
    ops.set_auto_calibration(True)
    return tmp_path


def slowed(monkeypatch, name: str, seconds: float = 0.03) -> list[int]:
    """Make backend ``name`` slower by ``seconds`` per call; returns a one-item list counting its calls."""
    calls = [0]
    cls = type(BACKENDS[name])
    original = cls.run

    def run(self, *args, **kwargs):
        calls[0] += 1
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return calls


def windows(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 12, 12, 2, 8, generator=gen, dtype=torch.float64, requires_grad=requires_grad) for _ in "qkv"
    ]


def test_off_by_default_and_the_variable_is_checked(monkeypatch):
    monkeypatch.setattr(calibration, "_setting", None)
    monkeypatch.delenv(calibration.ENV, raising=False)
    assert not calibration.calibration_enabled()
    q, k, v = windows()
    assert "calibrat" not in ops.explain(q, k, v, 3, stride=3)
    monkeypatch.setenv(calibration.ENV, "yes")
    with pytest.raises(ValueError, match="ATTNZOO_AUTO_CALIBRATION='yes'"):
        ops.na2d(q, k, v, 3, stride=3)
    with pytest.raises(TypeError, match="enabled='on'"):
        ops.set_auto_calibration("on")


@pytest.mark.parametrize("slow", ["partition", "native"])
def test_keeps_the_fastest_and_remembers_it(calibrating, monkeypatch, slow):
    fast = {"partition": "native", "native": "partition"}[slow]
    calls = slowed(monkeypatch, slow)
    q, k, v = windows()
    assert "the first call times ['native', 'partition']" in ops.explain(q, k, v, 3, stride=3)
    with ops.record_backends() as runs:
        out = ops.na2d(q, k, v, 3, stride=3)
    assert [r.backend for r in runs] == [fast]
    assert calls[0] == calibration.ROUNDS + 1  # a warm-up round, then the timed rounds
    torch.testing.assert_close(out, ops.na2d(q, k, v, 3, stride=3, backend="reference"), rtol=1e-12, atol=1e-12)
    explained = ops.explain(q, k, v, 3, stride=3)
    assert explained.startswith(f"{fast}: calibrated on this machine"), explained
    assert "ms" in explained
    # kept on disk: a new process (here: the in-memory choices dropped) reuses it without timing
    (saved,) = calibrating.glob("auto-*.json")
    choices = json.loads(saved.read_text())
    assert [c["backend"] for c in choices.values()] == [fast]
    assert choices.popitem()[1]["ms"][slow] > 30  # the slowed backend's median includes its 30 ms sleep
    calibration.forget()
    with ops.record_backends() as runs:
        ops.na2d(q, k, v, 3, stride=3)
    assert [r.backend for r in runs] == [fast]
    assert calls[0] == calibration.ROUNDS + 1  # the slowed backend was not timed again


def test_training_calls_are_timed_with_their_backward(calibrating, monkeypatch):
    from attnzoo.ops.backends import native

    backward_calls, fused_backward = [], native.kernel_backward
    monkeypatch.setattr(
        native, "kernel_backward", lambda *a, **kw: backward_calls.append(1) or fused_backward(*a, **kw)
    )
    q, k, v = windows(requires_grad=True)
    out = ops.na2d(q, k, v, 3, stride=3)
    assert len(backward_calls) == calibration.ROUNDS + 1  # every timed trial of the kernel ran its backward
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    reference = ops.na2d(q, k, v, 3, stride=3, backend="reference")
    for got, want in zip(grads, torch.autograd.grad(reference.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    signatures = list(json.loads(next(calibrating.glob("auto-*.json")).read_text()))
    assert len(signatures) == 1 and "requires_grad=True" in signatures[0]


def test_single_candidate_and_explicit_backends_are_not_timed(calibrating, monkeypatch):
    calls = slowed(monkeypatch, "native", 0.0)
    q, k, v = windows()
    ops.na2d(q, k, v, 3)  # overlapping windows: only the kernel is fast, nothing to calibrate
    ops.na2d(q, k, v, 3, stride=3, backend="native")
    with ops.use_backend("native"):
        ops.na2d(q, k, v, 3, stride=3)
    assert calls[0] == 3
    assert not list(calibrating.glob("auto-*.json"))
