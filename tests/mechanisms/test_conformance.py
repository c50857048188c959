"""Conformance suite: every registered mechanism, no per-mechanism test code (docs/architecture.md, "How correctness is shown")."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import attnzoo
from attnzoo.mechanisms import mechanism_info

from conftest import DEVICE, randomize_

NAMES = attnzoo.list_mechanisms()


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    info = mechanism_info(name)
    torch.manual_seed(seed)
    module = attnzoo.create(name, info.test_dim, **{**info.test_kwargs, **overrides})
    return module.eval().to(DEVICE)


def sample(name: str, batch: int = 2, size: tuple[int, ...] | None = None, dtype=torch.float32, seed: int = 1):
    info = mechanism_info(name)
    gen = torch.Generator().manual_seed(seed)
    size = info.test_size if size is None else size
    x = torch.randn(batch, *size, info.test_dim, generator=gen, dtype=dtype)
    if info.layout == "cross":
        context = torch.randn(batch, 5, info.test_dim, generator=gen, dtype=dtype)
        return (x.to(DEVICE), context.to(DEVICE))
    return (x.to(DEVICE),)


def expected_shape(module, x: torch.Tensor) -> tuple[int, ...]:
    return tuple(module.output_shape(tuple(x.shape))) if hasattr(module, "output_shape") else tuple(x.shape)


def test_registry_is_populated():
    assert len(NAMES) > 0
    for name in NAMES:
        info = mechanism_info(name)
        assert info.name == name and info.paper and 1950 < info.year < 2030
        assert info.reference, f"{name}: the registry entry must name its source (pip class, official code or paper)"
        assert info.layout in ("spatial", "sequence", "cross")


# The spatial-size names of the constructor vocabulary (docs/vocabulary.md): a backbone fits them to its stages.
SIZE_NAMES = ("kernel_size", "window_size", "grid_size", "pool_size", "sr_ratio", "num_windows")


def test_every_spatial_size_argument_is_declared_in_size_args():
    from attnzoo.mechanisms.registry import SIZE_RULES

    for name in NAMES:
        info = mechanism_info(name)
        params = inspect.signature(info.cls.__init__).parameters
        undeclared = [arg for arg in params if arg in SIZE_NAMES and arg not in info.size_args]
        assert not undeclared, f"{name}: size arguments {undeclared} missing from register_mechanism(size_args=...)"
        assert set(info.size_args) <= set(params), f"{name}: size_args names no constructor argument"
        assert set(info.size_args.values()) <= set(SIZE_RULES), f"{name}: size_args={info.size_args}"


def test_unknown_name_suggests_close_names():
    if not NAMES:
        pytest.skip("empty registry")
    wrong = NAMES[0][:-1] + "x"
    with pytest.raises(ValueError, match="did you mean"):
        attnzoo.create(wrong, 32)


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite(name):
    m = build(name)
    inputs = sample(name)
    y = m(*inputs)
    assert tuple(y.shape) == expected_shape(m, inputs[0])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    m = build(name).train()
    inputs = tuple(t.requires_grad_() for t in sample(name))
    y = m(*inputs)
    loss = (y * torch.randn_like(y)).sum()
    aux = m.aux_loss()  # the Mechanism interface: an auxiliary training loss, or None
    if aux is not None:
        loss = loss + aux
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert inputs[0].grad is not None and torch.isfinite(inputs[0].grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_batch_one_and_odd_sizes_work_or_raise_clearly(name):
    info = mechanism_info(name)
    m = build(name)
    odd = tuple(s + 1 if s % 2 == 0 else s for s in info.test_size)
    for batch, size in ((1, info.test_size), (1, odd), (3, odd)):
        inputs = sample(name, batch=batch, size=size)
        try:
            y = m(*inputs)
        except (ValueError, TypeError) as err:
            message = str(err)
            assert len(message) > 10 and any(ch.isdigit() for ch in message), f"unhelpful error: {message!r}"
            continue
        assert tuple(y.shape) == expected_shape(m, inputs[0])
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("empty", ["batch", "spatial"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_input_gives_empty_output_or_names_the_shape(name, empty):
    """Batch 0 or a zero-size spatial axis: an empty output of the right shape, or a ValueError naming x.shape."""
    info = mechanism_info(name)
    m = build(name)
    size = info.test_size if empty == "batch" else (0, *info.test_size[1:])
    inputs = sample(name, batch=0 if empty == "batch" else 2, size=size)
    try:
        y = m(*inputs)
    except ValueError as err:
        assert str(tuple(inputs[0].shape)) in str(err), f"the error does not name the input shape: {err}"
        return
    assert tuple(y.shape) == expected_shape(m, inputs[0])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_fixed_seed(name):
    inputs = sample(name)
    y1 = build(name, seed=3)(*inputs)
    y2 = build(name, seed=3)(*inputs)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    inputs = sample(name)
    source = build(name, seed=4)
    # move every parameter off its initial value, so the copy has something to carry
    randomize_(source, std=0.01, perturb=True)
    target = build(name, seed=5)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    torch.testing.assert_close(target(*inputs), source(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_forward_close_to_float32(name):
    m = build(name)
    inputs = sample(name)
    reference = m(*inputs)
    low = copy.deepcopy(m).to(torch.bfloat16)
    y = low(*(t.to(torch.bfloat16) for t in inputs))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    err = (y.float() - reference).norm() / reference.norm().clamp_min(1e-6)
    assert err < 0.1, f"bf16 relative error {err:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_float64_gradcheck(name):
    info = mechanism_info(name)
    m = build(name).to(torch.float64)
    inputs = sample(name, batch=1, dtype=torch.float64)
    x = inputs[0].requires_grad_()
    rest = inputs[1:]
    assert torch.autograd.gradcheck(lambda t: m(t, *rest), (x,), fast_mode=True, atol=1e-6, rtol=1e-4), info.name


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph(name):
    m = build(name)
    inputs = sample(name)
    compiled = torch.compile(m, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(*inputs), m(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name):
    m = build(name)
    inputs = sample(name)
    exported = torch.export.export(m, inputs)
    torch.testing.assert_close(exported.module()(*inputs), m(*inputs), rtol=1e-5, atol=1e-5)
