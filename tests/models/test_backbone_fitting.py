"""The backbone fits every spatial size a mechanism declares (``register_mechanism(size_args=...)``,
docs/vocabulary.md) to each stage's token grid, and the fitted mixer runs on that stage."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnzoo
from attnzoo import models
from attnzoo.mechanisms import mechanism_info
from attnzoo.models.backbone import Backbone, stage_defaults

SIZED = [
    n
    for n in attnzoo.list_mechanisms()
    if mechanism_info(n).size_args and mechanism_info(n).slot == "token" and mechanism_info(n).layout != "cross"
]

# Mechanisms whose own rule is not a plain bound by the grid side: a fitted value is refused at construction, so
# the backbone keeps the default (the mechanism pads the window, or zero padding makes a 3×3 kernel work on 2×2).
KEEPS_DEFAULT = {
    ("aggregated", "kernel_size"),  # odd and >= 3
    ("msa_conv", "kernel_size"),  # >= 3
    ("outlook", "kernel_size"),  # kernel 2 with padding 1 gives more windows than weight sets
    ("overlapping_cross", "window_size"),  # window·overlap_ratio must be even; a larger window is padded
}

# (grid, stage width) of the stages checked: tiny's last stage and a 7×7 one (its second).
STAGES = [((2, 2), 128), ((7, 7), 64)]


def ints(value) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in ints(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def check_fitted(name: str, kwargs: dict, grid: tuple[int, int]) -> None:
    """Each declared size argument obeys its rule on ``grid`` (or is a known kept default)."""
    info = mechanism_info(name)
    params = inspect.signature(info.cls.__init__).parameters
    side = min(grid)
    for arg, rule in info.size_args.items():
        value = kwargs.get(arg, params[arg].default)
        if value is None:  # derived by the mechanism from other arguments (eca's adaptive kernel, …)
            continue
        if (name, arg) in KEEPS_DEFAULT and value == params[arg].default:
            continue
        bound = side
        if rule == "span":
            dilation = kwargs.get("dilation", params["dilation"].default if "dilation" in params else 1)
            bound = side // max(ints(dilation) or [1])
        if rule == "dilation":
            bound = side // 2
        assert all(v <= max(bound, 1) for v in ints(value)), f"{name}: {arg}={value!r} ({rule}) on a {grid} stage"


@pytest.mark.parametrize("grid,dim", STAGES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", SIZED)
def test_declared_sizes_are_fitted_and_the_stage_runs(name, grid, dim):
    stage = Backbone._build_stage(0, name, dim, 1, grid, 2.0, {})
    check_fitted(name, stage.mixer_kwargs, grid)
    x = torch.randn(2, *grid, dim)
    with torch.no_grad():
        y = stage.eval()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_multi_axis_partition_fits_the_last_stage_of_tiny():
    model = models.create("tiny", mixers="multi_axis", in_chans=1, num_classes=3)
    assert model.grids[-1] == (2, 2)
    assert model.stages[-1].mixer_kwargs["window_size"] == 2
    assert [stage[0].mixer.mixer.window_size for stage in model.stages] == [(7, 7), (7, 7), (4, 4), (2, 2)]
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_rules_beyond_a_plain_bound():
    # num_windows is a count: on 2×2 it becomes 2, never the odd fallback 1 (topk=4 regions must still exist)
    assert stage_defaults("bi_level_routing", (2, 2), {})[0]["num_windows"] == 2
    assert all(c.get("num_windows", 7) == 2 for c in stage_defaults("bi_level_routing", (2, 2), {}))
    # span: kernel_size·dilation fits; dilation (1, 2) needs a kernel of 3 on 7×7 and dilation 1 on 2×2
    assert stage_defaults("factorization", (7, 7), {})[0]["kernel_size"] == 3
    first = stage_defaults("factorization", (2, 2), {})[0]
    assert (first["kernel_size"], first["dilation"]) == (2, (1, 1))
    # a user's dilation is honoured when fitting the kernel; a user's size is never changed
    assert stage_defaults("neighborhood", (7, 7), {"dilation": 3})[0]["kernel_size"] == 2
    assert stage_defaults("neighborhood", (2, 2), {"kernel_size": 9})[0]["kernel_size"] == 9
    # ratios and pool extents are fitted as bounds; the last candidate keeps extents, fits only ratios and counts
    assert stage_defaults("spatial_reduction", (4, 4), {}) == [{"sr_ratio": 4, "pool_size": 4}, {"sr_ratio": 4}]
    # the user's shift is kept while the window is fitted
    assert stage_defaults("window", (4, 4), {"shift_size": 3})[0] == {"window_size": 4, "shift_size": 3}


def test_sizes_not_declared_are_left_alone():
    # an argument that is not a declared size keeps its default even when it looks like one
    assert "halo_size" not in mechanism_info("halo").size_args
    assert all("halo_size" not in c for c in stage_defaults("halo", (2, 2), {}))
