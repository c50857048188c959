"""Shared test setup, plus the helpers several test modules import (``from conftest import ...``)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("attnzoo", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnzoo"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: no oversubscription on small CI machines


# The device the engine, conformance and parity tests run on: ATTNZOO_TEST_DEVICE=cuda runs them on a GPU unchanged.
DEVICE = torch.device(os.environ.get("ATTNZOO_TEST_DEVICE", "cpu"))
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason=f"CPU-only behaviour; ATTNZOO_TEST_DEVICE={DEVICE}")
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs ATTNZOO_TEST_DEVICE=cuda and a GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rand64(*shape, seed=0, grad=False):
    """A float64 standard-normal tensor from its own seeded generator (a leaf requiring grad if ``grad``)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


def hand_attention(q, k, v, scale, allowed=None, bias=None):
    """Textbook softmax attention, with explicit loops over batch, heads and queries: an independent oracle.

    q [B, *Sq, h, d], k [B, *Sk, h, d], v [B, *Sk, h, dv]; ``allowed``/``bias`` are [B, h, Nq, Nk].
    Returns (out [B, *Sq, h, dv], lse [B, *Sq, h]); a query with no allowed key gets out 0 and lse -inf.
    """
    B, h = q.shape[0], q.shape[-2]
    qf = q.reshape(B, -1, h, q.shape[-1])
    kf = k.reshape(B, -1, h, k.shape[-1])
    vf = v.reshape(B, -1, h, v.shape[-1])
    outs = torch.zeros(B, qf.shape[1], h, v.shape[-1], dtype=q.dtype)
    lses = torch.zeros(B, qf.shape[1], h, dtype=q.dtype)
    for b in range(B):
        for head in range(h):
            logits = (qf[b, :, head] @ kf[b, :, head].T) * scale
            if bias is not None:
                logits = logits + bias[b, head]
            for i in range(logits.shape[0]):
                keep = torch.ones(logits.shape[1], dtype=torch.bool) if allowed is None else allowed[b, head, i]
                if not keep.any():
                    lses[b, i, head] = float("-inf")
                    continue
                row = logits[i][keep]
                m = row.max()
                e = torch.exp(row - m)
                lses[b, i, head] = m + torch.log(e.sum())
                outs[b, i, head] = (e / e.sum()) @ vf[b, :, head][keep]
    return outs.reshape(*q.shape[:-1], v.shape[-1]), lses.reshape(q.shape[:-1])
