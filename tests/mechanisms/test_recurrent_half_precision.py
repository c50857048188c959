"""Half precision stays finite wherever fp32 is (issue 18, item 4): the decayed states and normalisers of the
recurrent mechanisms (lightning, retention) are kept in fp32 when the module runs in fp16 or bf16."""

from __future__ import annotations

import pytest
import torch

import attnzoo

CASES = [
    ("lightning", {}),
    ("lightning", {"is_causal": False}),
    ("lightning", {"mode": "recurrent"}),
    ("retention", {}),
    ("retention", {"mode": "quadratic"}),
    ("retention", {"mode": "recurrent"}),
]


@pytest.mark.parametrize("std", [1.0, 10.0, 30.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "name,kwargs", CASES, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'default'}" for n, k in CASES]
)
def test_half_precision_is_finite_where_fp32_is(name, kwargs, dtype, std):
    torch.manual_seed(0)
    module = attnzoo.create(name, 32, num_heads=2, **kwargs).eval()
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1)) * std
    with torch.no_grad():
        reference = module(x)
        half = module.to(dtype)(x.to(dtype))
    assert reference.isfinite().all(), "precondition: fp32 is finite"
    assert half.dtype == dtype
    assert half.isfinite().all(), f"{name} in {dtype} overflows at input std {std} while fp32 is finite"
    error = (half.float() - reference).norm() / reference.norm()
    assert error < 0.1, f"relative error {error:.3f}"
