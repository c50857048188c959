"""Backbones under bad input (issue 18, item 19): arguments and image batches are validated with errors that name
the argument and the rule; ``load`` names the file and what does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from attnzoo import models

BAD_CREATE = [
    ("num_classes_negative", dict(num_classes=-1), "num_classes=-1"),
    ("num_classes_float", dict(num_classes=10.0), "num_classes=10.0"),
    ("num_classes_bool", dict(num_classes=True), "num_classes=True"),
    ("in_chans_zero", dict(in_chans=0), "in_chans=0"),
    ("in_chans_str", dict(in_chans="1"), "in_chans='1'"),
    ("img_size_zero", dict(img_size=0), "img_size=0"),
    ("img_size_float", dict(img_size=28.0), "img_size=28.0"),
    ("img_size_triple", dict(img_size=(28, 28, 28)), "img_size=(28, 28, 28)"),
    ("img_size_str", dict(img_size="28"), "img_size='28'"),
    ("mixer_kwargs_list_of_lists", dict(mixer_kwargs=[[1], {}, {}, {}]), "mixer_kwargs"),
    ("mixer_kwargs_str", dict(mixer_kwargs=[{}, {}, {}, "x"]), "mixer_kwargs"),
    ("mixer_kwargs_three", dict(mixer_kwargs=[{}, {}, {}]), "mixer_kwargs"),
    ("mixer_kwargs_unknown", dict(mixer_kwargs={"no_such_argument": 1}), "no_such_argument"),
    ("name_list", dict(name=["tiny"]), "name="),
]


@pytest.mark.parametrize("case", BAD_CREATE, ids=[c[0] for c in BAD_CREATE])
def test_create_validates_arguments(case):
    _, kwargs, fragment = case
    args = dict(name="tiny", mixers="mhsa", num_classes=10, in_chans=1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=fragment.replace("(", r"\(").replace(")", r"\)")):
        models.create(**args)


@pytest.fixture(scope="module")
def model():
    return models.create("tiny", "mhsa", num_classes=10, in_chans=1).eval()


BAD_INPUT = [
    ("channels", torch.randn(2, 3, 28, 28), ValueError, "in_chans=1"),
    ("rank_3", torch.randn(2, 28, 28), ValueError, "x.shape=(2, 28, 28)"),
    ("rank_5", torch.randn(2, 1, 1, 28, 28), ValueError, "x.shape=(2, 1, 1, 28, 28)"),
    ("channels_last", torch.randn(2, 28, 28, 1), ValueError, "in_chans=1"),
    (
        "fp16_into_fp32",
        torch.randn(2, 1, 28, 28).half(),
        TypeError,
        "x.dtype=torch.float16 differs from the model's torch.float32",
    ),
    ("float64_into_fp32", torch.randn(2, 1, 28, 28).double(), TypeError, "torch.float64"),
    ("uint8", torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError, "x.dtype=torch.uint8 must be floating point"),
    ("empty_batch", torch.randn(0, 1, 28, 28), ValueError, "empty"),
    ("meta", torch.empty(2, 1, 28, 28, device="meta"), ValueError, "meta"),
    ("list", [[0.0]], TypeError, "list"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_forward_validates_the_image_batch(model, case):
    _, x, exc, fragment = case
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        model(x)


def test_load_names_the_file_and_what_does_not_fit(tmp_path, model):
    models.save(model, tmp_path)
    config = json.loads((tmp_path / "model.json").read_text())
    other = tmp_path / "other"
    models.save(models.create("tiny", "mhsa", num_classes=7, in_chans=1), other)
    (other / "model.json").write_text(json.dumps(config))  # weights of a 7-class head under a 10-class config
    with pytest.raises(ValueError, match=r"model.safetensors does not fit .*model.json: shape mismatch head.weight"):
        models.load(other)
    models.save(models.create("tiny", "window", num_classes=10, in_chans=1), other)
    (other / "model.json").write_text(json.dumps(config))  # window weights under an mhsa config
    with pytest.raises(ValueError, match=r"model.safetensors does not fit .*(missing|unexpected) keys"):
        models.load(other)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"size": "tiny", "colour": 3}', "unknown keys"),
        ('{"size": "huge"}', "does not describe a model"),
        ('{"size": "tiny", "num_classes": -3}', "num_classes=-3"),
        ("\udcff", ""),
    ],
)
def test_broken_model_json_names_the_file_and_rule(tmp_path, model, content, fragment):
    models.save(model, tmp_path)
    (tmp_path / "model.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"model.json.*{fragment}"):
        models.load(tmp_path)
