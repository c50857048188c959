"""Renamed arguments and choice values (docs/vocabulary.md): each old spelling still works for one release, warns
naming the old and the new spelling, and builds the same module as the new spelling (same weights, same output)."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch

import attnzoo
from attnzoo.mechanisms import mechanism_info

# (mechanism, old argument, new argument, value): every argument renamed by the vocabulary, in one table.
RENAMED_ARGUMENTS = [
    ("halo", "block_size", "window_size", 4),
    ("multi_axis", "partition_size", "window_size", 4),
    ("cross_shaped", "split_size", "window_size", 2),
    ("long_short_distance", "group_size", "window_size", 4),
    ("long_short_distance", "mode", "distance", "long"),
    ("cascaded_group", "window_resolution", "window_size", 4),
    ("cascaded_group", "key_dim", "qk_dim", 8),
    ("cascaded_group", "kernels", "kernel_size", 3),
    ("bi_level_routing", "n_win", "num_windows", 2),
    ("bi_level_routing", "side_dwconv", "kernel_size", 3),
    ("aggregated", "window_size", "kernel_size", 5),
    ("softmax_free", "ratio", "sr_ratio", 2),
    ("softmax_free", "conv_size", "kernel_size", 5),
    ("manhattan", "lce_kernel", "kernel_size", 3),
    ("learned_sparse", "reduce_c", "reduction", 4),
    ("lightning", "block_size", "chunk_size", 3),
    ("polarized", "mode", "arrangement", "sequential"),
]

# (mechanism, argument, old value, new value): computation forms renamed to mode ∈ {quadratic, chunkwise, recurrent}.
RENAMED_VALUES = [
    ("retention", "mode", "parallel", "quadratic"),
    ("linear", "mode", "parallel", "chunkwise"),
    ("lightning", "mode", "tiled", "chunkwise"),
    ("lightning", "mode", "naive", "quadratic"),
    ("gated_linear_2d", "mode", "chunked", "chunkwise"),
    ("noncausal_ssd", "mode", "parallel", "quadratic"),
]


def build(name: str, **kwargs) -> torch.nn.Module:
    info = mechanism_info(name)
    torch.manual_seed(7)
    return attnzoo.create(name, info.test_dim, **kwargs).eval()


def base_kwargs(name: str, *drop: str) -> dict:
    return {k: v for k, v in mechanism_info(name).test_kwargs.items() if k not in drop}


def assert_same_module(old: torch.nn.Module, new: torch.nn.Module, name: str) -> None:
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        torch.testing.assert_close(old_state[key], new_state[key], rtol=0, atol=0)
    info = mechanism_info(name)
    x = torch.randn(2, *info.test_size, info.test_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)


def test_the_table_lists_every_declared_rename():
    declared = set()
    for name in attnzoo.list_mechanisms():
        renames = getattr(mechanism_info(name).cls.__init__, "renamed_kwargs", {})
        declared |= {(name, old, new) for old, new in renames.items()}
    assert declared == {(name, old, new) for name, old, new, _ in RENAMED_ARGUMENTS}


def test_the_table_lists_every_renamed_value():
    found = set()
    for name in attnzoo.list_mechanisms():
        tree = ast.parse(inspect.getsource(inspect.getmodule(mechanism_info(name).cls)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_choice":
                for keyword in node.keywords:
                    if keyword.arg == "renamed":
                        arg, renames = ast.literal_eval(node.args[0]), ast.literal_eval(keyword.value)
                        found |= {(name, arg, old, new) for old, new in renames.items()}
    assert found == set(RENAMED_VALUES)


@pytest.mark.parametrize("name,old,new,value", RENAMED_ARGUMENTS, ids=lambda v: str(v))
def test_old_argument_name_warns_and_builds_the_same_module(name, old, new, value):
    kwargs = base_kwargs(name, old, new)
    with pytest.warns(DeprecationWarning, match=rf"{old}=.*deprecated.*use {new}="):
        old_module = build(name, **kwargs, **{old: value})
    new_module = build(name, **kwargs, **{new: value})
    assert_same_module(old_module, new_module, name)
    assert old_module.extra_repr() == new_module.extra_repr()


@pytest.mark.parametrize("name,old,new,value", RENAMED_ARGUMENTS, ids=lambda v: str(v))
def test_old_and_new_name_together_is_a_type_error_naming_both(name, old, new, value):
    with pytest.raises(TypeError, match=rf"{old}=.*{new}="):
        build(name, **base_kwargs(name, old, new), **{old: value, new: value})


def test_new_names_are_in_the_signature_and_old_ones_are_not():
    for name, old, new, _ in RENAMED_ARGUMENTS:
        params = inspect.signature(mechanism_info(name).cls.__init__).parameters
        assert new in params and old not in params, name


@pytest.mark.parametrize("name,arg,old,new", RENAMED_VALUES, ids=lambda v: str(v))
def test_old_choice_value_warns_and_builds_the_same_module(name, arg, old, new):
    kwargs = base_kwargs(name, arg)
    if name == "linear":  # the chunked form is the causal one; recurrent needs is_causal too
        kwargs["is_causal"] = True
    with pytest.warns(DeprecationWarning, match=re.escape(f"{arg}={old!r} is deprecated") + rf".*{arg}={new!r}"):
        old_module = build(name, **kwargs, **{arg: old})
    new_module = build(name, **kwargs, **{arg: new})
    assert getattr(old_module, arg) == new
    assert_same_module(old_module, new_module, name)


def test_new_names_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, _, new, value in RENAMED_ARGUMENTS:
            build(name, **base_kwargs(name, new), **{new: value})
        for name, arg, _, new in RENAMED_VALUES:
            build(name, **base_kwargs(name, arg), **({"is_causal": True} if name == "linear" else {}), **{arg: new})
