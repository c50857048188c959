"""Shared test setup, and the one home of the helpers the test folders import (``from conftest import ...``).

The tests mirror the source: tests/ops, tests/mechanisms, tests/models, tests/tools, tests/training, tests/cli,
tests/interop; ``pyproject.toml`` puts tests/ on ``sys.path`` (pytest ``pythonpath``), so every folder imports this
module and tests/browser.py by name. Test file names are unique across folders (no ``__init__.py``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import attnzoo

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


def randomize_(
    module: torch.nn.Module,
    std: float = 0.5,
    *,
    seed: int | None = None,
    perturb: bool = False,
    norms_near_one: bool = False,
) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic random values, in place; returns ``module``.

    Parity tests need it: at initialisation many weights are 0 or 1 (zero biases, unit norms, zero-initialised
    projections), which hides a wrong key map or a missing term. Parameters become N(0, std²) draws (added to their
    value if ``perturb``; 1-D ``weight``s, the norms' scales, become 1 + N(0, std²) if ``norms_near_one``), BatchNorm
    running means N(0, 0.3²) and running variances U(0.5, 1.5). Draws come from a generator seeded with ``seed``, or
    from torch's global generator (seeded per test by ``_seed``) when ``seed`` is None.
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
            if perturb:
                p.add_(noise)
            else:
                p.copy_(noise + 1.0 if norms_near_one and name.endswith("weight") and p.dim() == 1 else noise)
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return module


def create_random(
    name: str, dim: int = 16, *, weight_std: float = 0.5, weight_seed: int | None = None, **kwargs
) -> torch.nn.Module:
    """``attnzoo.create(name, dim, **kwargs)`` in float64 and eval mode with every weight randomised (``randomize_``
    with ``weight_std`` and ``weight_seed``): the module a parity or property test compares with its oracle."""
    return randomize_(attnzoo.create(name, dim, **kwargs).double().eval(), weight_std, seed=weight_seed)


def dense_attention(q, k, v, bias=None, *, scale=None, allowed=None):
    """Softmax attention over flattened tokens, by einsum: q ``[B, N, h, d]``, k/v ``[B, M, h, d]``; ``bias``
    broadcasts to ``[B, h, N, M]``, ``allowed`` (bool, True = kept) to the same; ``scale`` defaults to d^-1/2."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v)


def coords(*shape: int) -> torch.Tensor:
    """``[N, D]`` integer coordinates of a grid of ``shape``, row-major."""
    return torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, len(shape))


def nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last ``(B, H, W, C)`` to channels-first ``(B, C, H, W)``, the layout of torch/timm conv modules."""
    return x.permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """Channels-first ``(B, C, H, W)`` back to attnzoo's channels-last ``(B, H, W, C)``."""
    return x.permute(0, 2, 3, 1)


def heads_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., heads·d]`` to ``[..., heads, d]``."""
    return t.reshape(*t.shape[:-1], heads, -1)


def changed_positions(module, x: torch.Tensor, position, eps: float = 1.0) -> torch.Tensor:
    """Boolean spatial map of image 0's outputs that change when its token at ``position`` is perturbed by ``eps``."""
    y0 = module(x)
    x1 = x.clone()
    x1[(0, *position)] += eps
    return (module(x1) - y0).abs().amax(-1)[0] > 1e-12


def one_error_line(err: str, command: str | None = None) -> str:
    """The only non-empty line of a command's stderr, which must hold no traceback (and, given ``command``, start with
    ``attnzoo COMMAND: error:``)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    if command is not None:
        assert lines[0].startswith(f"attnzoo {command}: error:"), lines[0]
    return lines[0]


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
