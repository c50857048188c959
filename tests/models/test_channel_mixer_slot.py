"""The channel-mixer slot of backbone blocks: a ``slot="channel"`` mechanism replaces the MLP, is saved and restored."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import models
from attnzoo.mechanisms.convolutional_glu import ConvolutionalGLU
from attnzoo.models.backbone import Mlp

from conftest import randomize_

CHANNEL = [n for n in attnzoo.list_mechanisms() if attnzoo.mechanism_info(n).slot == "channel"]


def test_registry_marks_convolutional_glu_as_a_channel_mixer():
    assert "convolutional_glu" in CHANNEL
    assert attnzoo.mechanism_info("neighborhood").slot == "token"


def test_channel_mixer_replaces_every_mlp_and_trains():
    model = models.create("tiny", mixers="neighborhood", channel_mixer="convolutional_glu", in_chans=1)
    blocks = [block for stage in model.stages for block in stage]
    assert all(isinstance(block.mlp.mixer, ConvolutionalGLU) for block in blocks)
    # the backbone's mlp_ratio (2 for tiny) reaches the channel mixer: hidden = int(2/3 · 2·dim)
    assert [block.mlp.mixer.hidden for block in blocks] == [int(2 * 2 * d / 3) for d in (32, 64, 128, 128, 256)]
    x = torch.randn(2, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_default_is_the_mlp_and_per_stage_choice_works():
    model = models.create(
        "tiny",
        mixers="neighborhood",
        channel_mixer=[None, "convolutional_glu", None, None],
        channel_mixer_kwargs=[None, {"mlp_ratio": 3.0}, None, None],
        in_chans=1,
    )
    kinds = [type(stage[0].mlp) for stage in model.stages]
    assert kinds[0] is Mlp and kinds[2] is Mlp and kinds[3] is Mlp
    assert model.stages[1][0].mlp.mixer.hidden == int(2 * int(64 * 3.0) / 3)
    assert isinstance(models.create("tiny", mixers="neighborhood", in_chans=1).stages[0][0].mlp, Mlp)


def test_channel_mixer_block_computes_x_plus_mixer_of_norm():
    model = models.create("tiny", mixers="neighborhood", channel_mixer="convolutional_glu", in_chans=1).eval()
    block = model.stages[0][0]
    x = torch.randn(2, 14, 14, 32)
    after_token = x + block.mixer(block.norm1(x))
    expected = after_token + block.mlp.mixer(block.norm2(after_token))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_save_load_restores_the_channel_mixer(tmp_path):
    model = models.create(
        "tiny", mixers="window", channel_mixer="convolutional_glu", channel_mixer_kwargs={"kernel_size": 5}, in_chans=1
    ).eval()
    randomize_(model, std=0.01, perturb=True)
    models.save(model, tmp_path)
    loaded = models.load(tmp_path)
    assert models.model_config(loaded)["channel_mixer"] == ["convolutional_glu"] * 4
    mixer = loaded.stages[0][0].mlp.mixer
    assert isinstance(mixer, ConvolutionalGLU) and mixer.kernel_size == 5
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_config_without_channel_mixer_builds_the_mlp_model():
    model = models.create("tiny", mixers="neighborhood", in_chans=1).eval()
    stored = models.model_config(model)
    del stored["channel_mixer"], stored["channel_mixer_kwargs"]  # a config written before the channel slot
    rebuilt = models.create(stored.pop("size"), **stored).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # same modules: the MLP in every block
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_create_accepts_the_deprecated_size_keyword():
    with pytest.warns(DeprecationWarning, match="size"):
        model = models.create(size="tiny", mixers="mhsa", in_chans=1)
    assert model.config["size"] == "tiny"


def test_wrong_slot_raises_a_named_error():
    with pytest.raises(ValueError, match=r"mixers\[0\]='convolutional_glu' is a channel mixer.*channel_mixer="):
        models.create("tiny", mixers="convolutional_glu", in_chans=1)
    with pytest.raises(ValueError, match=r"channel_mixers\[2\]='mhsa' is a token mixer.*mixers="):
        models.create("tiny", mixers="neighborhood", channel_mixer=[None, None, "mhsa", None], in_chans=1)
    with pytest.raises(ValueError, match="unknown mechanism"):
        models.create("tiny", mixers="neighborhood", channel_mixer="convolutional_gluu", in_chans=1)
    with pytest.raises(TypeError, match="channel_mixer must hold"):
        models.create("tiny", mixers="neighborhood", channel_mixer=[None, 3, None, None], in_chans=1)
    with pytest.raises(ValueError, match="one per stage"):
        models.create("tiny", mixers="neighborhood", channel_mixer=["convolutional_glu"] * 3, in_chans=1)


@pytest.mark.parametrize("name", CHANNEL)
def test_every_channel_mechanism_fills_the_slot(name):
    model = models.create("tiny", mixers="neighborhood", channel_mixer=name, in_chans=1)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
