"""Every registered mechanism's default configuration sees what its registry entry says it sees.

``MechanismInfo.receptive_field`` declares the class of one output token's gradient receptive field (global, local,
causal, channel). Here each default configuration is built at the grid sizes and widths the tools use (``attnzoo viz``:
28×28, dim 32; ``attnzoo bench``: 56×56, dim 64) and its measured class must equal the declared one, so a default that
silently degenerates (a mixer that mixes no tokens, a branch with no heads) fails for every mechanism to come.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnzoo
from attnzoo.mechanisms import mechanism_info
from attnzoo.tools.receptive import classify_fields, gradient_receptive_field, receptive_field_class
from attnzoo.tools.workload import prepare

TOOL_WORKLOADS = [(28, 32), (56, 64)]  # (grid side, width): viz's defaults, bench's defaults


def _field(size: int, seen: list[tuple[int, int]]) -> np.ndarray:
    field = np.zeros((size, size))
    for y, x in seen:
        field[y, x] = 1.0
    return field


def test_classify_fields_on_hand_made_fields():
    size, centre = 6, (3, 3)
    every = np.ones((size, size))
    only_self = _field(size, [centre])
    before = [(y, x) for y in range(size) for x in range(size) if y * size + x <= 3 * size + 3]
    window = [(y, x) for y in range(2, 5) for x in range(2, 5)]
    assert classify_fields(every, every) == "global"
    assert classify_fields(only_self, _field(size, [(0, 0)])) == "channel"
    assert classify_fields(_field(size, before), _field(size, [(0, 0)])) == "causal"
    assert classify_fields(_field(size, window), _field(size, [(0, 0), (0, 1), (1, 0), (1, 1)])) == "local"
    # a field that stops before the query but whose first query sees more than itself is not causal
    assert classify_fields(_field(size, before), _field(size, [(0, 0), (0, 1)])) == "local"


@pytest.mark.parametrize("size,dim", TOOL_WORKLOADS)
@pytest.mark.parametrize("name", attnzoo.list_mechanisms())
def test_default_configuration_has_the_declared_receptive_field(name, size, dim):
    info = mechanism_info(name)
    prepared = prepare(name, size, dim)
    assert prepared.kwargs == {}, f"{name}'s defaults cannot run at {size}×{size}, dim {dim}: {prepared.note}"
    measured = receptive_field_class(prepared.module, info, size, dim)
    assert measured == info.receptive_field, (
        f"{name} at {size}×{size}, dim {dim}: registry declares {info.receptive_field!r}, the default sees {measured!r}"
    )


def test_gaussian_adaptive_default_sees_every_token():
    info = mechanism_info("gaussian_adaptive")
    module = prepare("gaussian_adaptive", 28, 32).module
    field = gradient_receptive_field(module, info, 28, 32, (5, 9))
    assert np.count_nonzero(field) == 28 * 28
    gate = attnzoo.create("gaussian_adaptive", 32, norm_axis="channels")  # the per-token gate stays an option
    assert np.count_nonzero(gradient_receptive_field(gate, info, 28, 32, (5, 9))) == 1


@pytest.mark.parametrize("dim", [32, 48, 64, 96, 128, 256])
def test_hilo_default_has_both_branches_at_every_width(dim):
    m = attnzoo.create("hilo", dim)
    assert m.l_heads >= 1 and m.h_heads >= 1, (dim, m.l_heads, m.h_heads)
    low = attnzoo.create("hilo", dim, alpha=0.2)  # a small alpha needs more heads for one Lo-Fi head
    assert low.l_heads >= 1 and low.h_heads >= 1


def test_hilo_refuses_an_empty_branch_and_allows_one_branch_on_purpose():
    with pytest.raises(ValueError, match=r"num_heads=1 with alpha=0\.9.*both branches"):
        attnzoo.create("hilo", 32, num_heads=1)
    assert attnzoo.create("hilo", 32, num_heads=1, alpha=1.0).h_heads == 0  # all Lo-Fi, asked for
    assert attnzoo.create("hilo", 32, num_heads=1, alpha=0.0).l_heads == 0  # all Hi-Fi, asked for


@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_cross_shaped_default_runs_at_every_backbone_width(dim):
    m = attnzoo.create("cross_shaped", dim)
    assert m.num_heads % 2 == 0
