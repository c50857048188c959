"""State between blocks (``BlockState``) and ``forward_cross``, the mechanism that uses it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import BlockState
from attnzoo.models.backbone import Backbone, Stage

from conftest import randomize_

DT = torch.float64


def make(**kwargs):
    torch.manual_seed(0)
    m = attnzoo.create("forward_cross", 16, num_heads=2, kernel_size=3, stride=2, **kwargs).to(DT).eval()
    return randomize_(m, std=0.3, perturb=True)


def oracle(m, x, earlier=()):
    """The definition written out: keys/values = tokens ∪ LN(cross tokens), cross logits + per-head bias."""
    b, h, w, c = x.shape
    heads = m.num_heads
    merged = F.conv2d(x.permute(0, 3, 1, 2), m.merge.weight, stride=2, padding=1, groups=c)
    own = merged.flatten(2).transpose(1, 2) * m.cross_scale
    entries = [*earlier, (own, m.cross_bias)]
    cross = F.layer_norm(torch.cat([t for t, _ in entries], 1), (c,), m.cross_norm.weight, m.cross_norm.bias)
    tokens = x.reshape(b, h * w, c)
    wq, wk, wv = m.qkv.weight.chunk(3)
    bq, bk, bv = m.qkv.bias.chunk(3)
    keys_in = torch.cat([tokens, cross], 1)
    cross_bias = [bb[:, None].expand(-1, t.shape[1]) for t, bb in entries]
    bias = torch.cat([torch.zeros(heads, h * w, dtype=DT), *cross_bias], 1)
    out = torch.zeros(b, h * w, c, dtype=DT)
    d = c // heads
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        q = tokens @ wq[sl].T + bq[sl]
        k = keys_in @ wk[sl].T + bk[sl]
        v = keys_in @ wv[sl].T + bv[sl]
        weights = torch.softmax(q @ k.transpose(1, 2) / d**0.5 + bias[head], dim=-1)
        out[..., sl] = weights @ v
    return (out @ m.proj.weight.T + m.proj.bias).reshape(x.shape)


def test_standalone_matches_the_written_out_definition():
    m = make()
    x = torch.randn(2, 5, 6, 16, dtype=DT)
    torch.testing.assert_close(m(x), oracle(m, x), rtol=1e-10, atol=1e-10)


def test_state_passes_earlier_tokens_and_respects_max_blocks():
    first, second = make(), make(max_blocks=1)
    with torch.no_grad():
        second.merge.weight.mul_(-1.5)
    x0, x1, x2 = (torch.randn(2, 5, 6, 16, dtype=DT) for _ in range(3))
    state = BlockState()
    first(x0, state)
    (written,) = state.read("forward_cross")
    y1 = second(x1, state)
    torch.testing.assert_close(y1, oracle(second, x1, [written]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y1, second(x1)), "the earlier block's tokens changed nothing"
    # max_blocks=1: a third call sees only the most recent earlier block.
    entries = state.read("forward_cross")
    assert len(entries) == 2
    torch.testing.assert_close(second(x2, state), oracle(second, x2, entries[1:]), rtol=1e-10, atol=1e-10)


def test_bad_state_is_rejected():
    m = make()
    with pytest.raises(TypeError, match="BlockState"):
        m(torch.randn(1, 4, 4, 16, dtype=DT), state=[])
    state = BlockState()
    m(torch.randn(2, 4, 4, 16, dtype=DT), state)
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(3, 4, 4, 16, dtype=DT), state)


def small_backbone(mixers=("forward_cross", "mhsa")):
    torch.manual_seed(0)
    return Backbone(list(mixers), dims=(32, 64), depths=(3, 2), img_size=28, num_classes=5).eval()


def test_backbone_blocks_see_the_tokens_of_earlier_blocks_of_their_stage():
    model = small_backbone()
    stage = model.stages[0]
    assert isinstance(stage, Stage) and all(b.mixer.uses_block_state for b in stage)
    assert not model.stages[1][0].mixer.uses_block_state
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.mixer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out))) for b in stage]
    model(torch.randn(2, 3, 28, 28))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3
    mixers = [b.mixer.mixer for b in stage]
    replay = BlockState()
    for i, (mixer, (x, y)) in enumerate(zip(mixers, seen)):
        torch.testing.assert_close(mixer(x, replay), y, rtol=1e-6, atol=1e-6)
        if i > 0:  # a later block differs from what it would compute without the state
            assert (mixer(x) - y).abs().max() > 1e-4, f"block {i} ignored the earlier blocks"
    assert len(replay.read("forward_cross")) == 3


def test_state_carries_gradients_back_to_earlier_blocks():
    first, second = make(), make()
    state = BlockState()
    first(torch.randn(2, 5, 6, 16, dtype=DT), state)
    y = second(torch.randn(2, 5, 6, 16, dtype=DT), state)
    grad = torch.autograd.grad(y.sum(), [first.merge.weight, first.cross_bias])
    assert all(g.abs().sum() > 0 for g in grad)


def test_standalone_stage_and_fresh_state_per_forward():
    model = small_backbone()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # no state leaks between forward passes


def test_backbone_save_load_round_trip(tmp_path):
    source = small_backbone()
    randomize_(source, std=0.01, perturb=True)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    assert "stages.0.1.mixer.mixer.cross_scale" in source.state_dict()
    target = small_backbone()
    target.load_state_dict(torch.load(path))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    clone = copy.deepcopy(source)
    torch.testing.assert_close(clone(x), source(x), rtol=0, atol=0)


def test_backbone_with_block_state_compiles_and_exports():
    model = small_backbone(("forward_cross", "self_guided"))
    x = torch.randn(2, 3, 28, 28)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
