"""``check_resolution``: the one place where ``input_resolution`` (and other grid sizes) become tuples."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.mechanisms._base import check_resolution


@pytest.mark.parametrize(
    ("value", "rank", "expected"),
    [(7, 2, (7, 7)), ((3, 5), 2, (3, 5)), ([3, 5], 2, (3, 5)), (torch.Size([2, 4]), 2, (2, 4)), (9, None, (9,)),
     ((2, 3, 4), None, (2, 3, 4)), (4, 3, (4, 4, 4))],
)  # fmt: skip
def test_ints_and_sequences_become_tuples(value, rank, expected):
    assert check_resolution("input_resolution", value, rank) == expected


@pytest.mark.parametrize("value", [0, -1, (3,), (3, 4, 5), (3, 0), (3.0, 4), "34", None, True, (True, 2), ()])
def test_bad_values_name_the_argument(value):
    with pytest.raises(ValueError, match=r"input_resolution=.* must be an int >= 1 or a tuple of 2 of them"):
        check_resolution("input_resolution", value)


def test_minimum_is_enforced():
    with pytest.raises(ValueError, match=r"pretrain_size=\(1, 4\) must be an int >= 2"):
        check_resolution("pretrain_size", (1, 4), minimum=2)


@pytest.mark.parametrize(
    ("name", "kwargs", "stored"),
    [
        ("agent", {"num_heads": 2, "num_agents": 4, "input_resolution": 6}, (6, 6)),
        ("aggregated", {"num_heads": 2, "kernel_size": 3, "sr_ratio": 2, "input_resolution": 6}, (6, 6)),
        ("learned_sparse", {"num_heads": 2, "input_resolution": 36}, (36,)),
        ("learned_sparse", {"num_heads": 2, "input_resolution": [6, 6]}, (6, 6)),
    ],
)
def test_mechanisms_store_the_normalised_resolution(name, kwargs, stored):
    assert attnzoo.create(name, 32, **kwargs).input_resolution == stored


def test_spectral_gating_takes_an_int_resolution():
    m = attnzoo.create("spectral_gating", 16, input_resolution=8)
    assert m.filter_size == (8, 5)
    with pytest.raises(ValueError, match=r"filter_size=\(8, 4\) disagrees with input_resolution=\(8, 8\)"):
        attnzoo.create("spectral_gating", 16, input_resolution=8, filter_size=(8, 4))
