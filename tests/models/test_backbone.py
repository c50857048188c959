"""Backbones with a pluggable mixer: shapes, per-stage defaults and errors, timm registration, save/load."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import models
from attnzoo.models import MixerAdapter, stage_defaults

NAMES = set(attnzoo.list_mechanisms())
MIXED = ("neighborhood", "neighborhood", "mhsa", "mhsa")


def need(*names: str) -> None:
    missing = [n for n in names if n not in NAMES]
    if missing:
        pytest.skip(f"mechanisms not registered yet: {missing}")


@pytest.mark.parametrize("mixers", ["neighborhood", "window", "mhsa", MIXED])
def test_shapes_and_feature_maps(mixers):
    need(*([mixers] if isinstance(mixers, str) else mixers))
    model = models.create("tiny", mixers=mixers, num_classes=10, in_chans=1, img_size=28)
    x = torch.randn(2, 1, 28, 28)
    features = model.forward_features(x)
    assert [tuple(f.shape) for f in features] == [(2, 14, 14, 32), (2, 7, 7, 64), (2, 4, 4, 128), (2, 2, 2, 256)]
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_size_and_rgb():
    model = models.create("small", mixers="neighborhood", num_classes=5, in_chans=3, img_size=64)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)]
    assert [len(stage) for stage in model.stages] == [2, 2, 6, 2]


def test_defaults_fit_small_stages_and_user_kwargs_win():
    model = models.create(
        "tiny", mixers="neighborhood", in_chans=1, mixer_kwargs=[{"kernel_size": 3}, None, None, None]
    )
    kernels = [stage[0].mixer.mixer.kernel_size for stage in model.stages]
    assert kernels == [(3, 3), (7, 7), (4, 4), (2, 2)]


def test_mixed_stages_use_the_named_mechanisms():
    need(*MIXED)
    model = models.create("tiny", mixers=MIXED, in_chans=1)
    names = [type(stage[0].mixer.mixer).mechanism_name for stage in model.stages]
    assert names == list(MIXED)
    assert model.stages[2][0].mixer.flatten and not model.stages[0][0].mixer.flatten


def test_sequence_mechanism_gets_flattened_tokens():
    need("mhsa")
    seen = []
    adapter = MixerAdapter("mhsa", 32, num_heads=2)
    adapter.mixer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    x = torch.randn(2, 3, 5, 32)
    y = adapter(x)
    assert y.shape == (2, 3, 5, 32)
    assert [tuple(tokens.shape) for tokens, _ in seen] == [(2, 15, 32)]
    tokens, mixed = seen[0]
    cells = [(i, j) for i in range(3) for j in range(5)]  # row-major: token n is cell (n // 5, n % 5)
    assert torch.equal(tokens, torch.stack([x[:, i, j] for i, j in cells], dim=1))
    assert torch.equal(torch.stack([y[:, i, j] for i, j in cells], dim=1), mixed)


def test_input_resolution_is_passed_when_needed():
    need_size = [n for n in sorted(NAMES) if attnzoo.mechanism_info(n).needs_input_size]
    if not need_size:
        pytest.skip("no registered mechanism needs an input size")
    assert stage_defaults(need_size[0], (7, 5), {})[0]["input_resolution"] == (7, 5)
    assert "input_resolution" not in stage_defaults("neighborhood", (7, 5), {})[0]


def test_stage_that_cannot_fit_names_stage_mixer_and_size():
    with pytest.raises(ValueError, match=r"stage 1 \(7×7 tokens, dim 64\): mixer 'neighborhood'.*kernel_size"):
        models.create("tiny", mixers="neighborhood", in_chans=1, mixer_kwargs={"kernel_size": 9})


def test_bad_arguments():
    with pytest.raises(ValueError, match="name='huge' is not a known model"):
        models.create("huge")
    with pytest.raises(ValueError, match="one per stage"):
        models.create("tiny", mixers=("neighborhood", "neighborhood"))
    with pytest.raises(ValueError, match="unknown mechanism"):
        models.create("tiny", mixers="neighbourhood")


def test_timm_registration():
    timm = pytest.importorskip("timm")
    assert "attnzoo_tiny" in timm.list_models("attnzoo_*")
    model = timm.create_model("attnzoo_tiny", mixers="neighborhood", num_classes=7, in_chans=1, img_size=28)
    assert isinstance(model, models.Backbone)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("attnzoo_tiny", pretrained=True)


def test_save_and_load_round_trip(tmp_path):
    model = models.create("tiny", mixers="neighborhood", num_classes=10, in_chans=1).eval()
    models.save(model, tmp_path)
    loaded = models.load(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    weights = tmp_path / models.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        models.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finished attnzoo run folder"):
        models.load(tmp_path / "nothing")
