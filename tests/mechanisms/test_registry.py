"""The registry's field list is written once (``MechanismInfo``): ``register_mechanism`` takes exactly those fields."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch.nn as nn

import attnzoo
from attnzoo.mechanisms import registry
from attnzoo.mechanisms.registry import MechanismInfo, register_mechanism

REQUIRED = {"family": "test", "paper": "A. Author, A test paper", "year": 2024}


@pytest.fixture
def fresh_name():
    name = f"zz_registry_{uuid.uuid4().hex[:8]}"
    yield name
    registry._REGISTRY.pop(name, None)


def plain_module() -> type:
    return type("Plain", (nn.Module,), {})


def test_every_field_of_mechanism_info_can_be_registered(fresh_name):
    """A value for every field (a non-default one where possible) reaches the stored entry unchanged."""
    values = {**REQUIRED, "layout": "sequence", "native_rank": 1, "complexity": "linear", "reference": "somewhere",
              "needs_input_size": True, "paper_identity": True, "is_attention": False, "slot": "channel",
              "receptive_field": "channel", "note": "a note", "test_kwargs": {"a": 1}, "test_size": [4],
              "test_dim": 8, "size_args": {"window_size": "extent"}}  # fmt: skip
    assert set(values) == {f.name for f in dataclasses.fields(MechanismInfo)} - {"name", "cls"}
    cls = register_mechanism(fresh_name, **values)(plain_module())
    info = attnzoo.mechanism_info(fresh_name)
    assert info.cls is cls and info.name == fresh_name and cls.mechanism_name == fresh_name
    assert {k: getattr(info, k) for k in values} == {**values, "test_size": (4,)}


def test_defaults_come_from_the_dataclass(fresh_name):
    register_mechanism(fresh_name, **REQUIRED)(plain_module())
    info = attnzoo.mechanism_info(fresh_name)
    defaults = MechanismInfo(fresh_name, info.cls, **REQUIRED)
    assert info == defaults and info.layout == "spatial" and info.test_kwargs == {}


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({**REQUIRED, "causal_capable": True}, TypeError, "unknown fields ['causal_capable']"),
        ({**REQUIRED, "layuot": "spatial"}, TypeError, "unknown fields ['layuot']"),
        ({"family": "test", "paper": "p"}, TypeError, "needs the fields ['year']"),
        ({**REQUIRED, "layout": "grid"}, ValueError, "layout='grid' must be one of ('spatial', 'sequence', 'cross')"),
        ({**REQUIRED, "slot": "mlp"}, ValueError, "slot='mlp' must be one of ('token', 'channel')"),
        ({**REQUIRED, "receptive_field": "wide"}, ValueError, "receptive_field='wide' must be one of"),
        ({**REQUIRED, "complexity": "cubic"}, ValueError, "complexity='cubic' must be one of"),
        ({**REQUIRED, "size_args": {"window_size": "side"}}, ValueError, "each rule must be one of"),
    ],
)
def test_bad_registrations_are_refused_naming_the_field(fresh_name, fields, error, fragment):
    with pytest.raises(error) as exc:
        register_mechanism(fresh_name, **fields)(plain_module())
    assert fragment in str(exc.value)
    assert fresh_name not in registry._REGISTRY


def test_the_registry_dict_is_copied(fresh_name):
    kwargs = {"num_heads": 2}
    register_mechanism(fresh_name, **REQUIRED, test_kwargs=kwargs)(plain_module())
    kwargs["num_heads"] = 3
    assert attnzoo.mechanism_info(fresh_name).test_kwargs == {"num_heads": 2}
