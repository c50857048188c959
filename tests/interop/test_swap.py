"""``attnzoo.swap`` on timm models: the swapped model computes the original's function (float64, outputs and input
gradients to 1e-8 relative) at two resolutions per family; mixer changes carry the projections; unsupported modules
are listed (``strict`` raises before touching the model); importing attnzoo does not import timm."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import attnzoo

timm = pytest.importorskip("timm")

from attnzoo.interop.timm import FAMILIES, SwapEntry  # noqa: E402

from conftest import randomize_  # noqa: E402

DT = torch.float64


def halonet(**kwargs) -> nn.Module:
    """A two-attention-stage HaloNet (timm ByobNet with ``self_attn_layer='halo'``), block 2, halo 1, strides 2."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5),
        ),
        stem_chs=16,
        stem_type="tiered",
        stem_pool="maxpool",
        self_attn_layer="halo",
        self_attn_kwargs=dict(block_size=2, halo_size=1, num_heads=2),
    )
    return ByobNet(cfg, **kwargs)


def volo(**kwargs) -> nn.Module:
    from timm.models.volo import VOLO  # the volo_* entry points fix layers / widths

    return VOLO(num_classes=5, **VOLO_ARGS, **kwargs)


def timm_model(name: str, **kwargs):
    return lambda **size_kwargs: timm.create_model(name, pretrained=False, num_classes=5, **kwargs, **size_kwargs)


SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))
VIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
MAXVIT = dict(embed_dim=(16, 32), depths=(1, 1), stem_width=16, transformer_dim_head=8)
PVT = dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 2), mlp_ratios=(2, 2))
CONVIT = dict(embed_dim=32, depth=3, local_up_to_layer=2, num_heads=2, patch_size=8)
CROSSVIT = dict(
    img_scale=(1.0, 1.0),
    patch_size=(12, 16),
    embed_dim=(16, 32),
    depth=((1, 1, 0),),
    num_heads=(2, 2),
    mlp_ratio=(2, 2, 1),
)
VOLO_ARGS = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2), stem_hidden_dim=16)
DAVIT = dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), window_size=4)
EFFICIENTVIT = dict(
    embed_dim=(16, 32, 48), key_dim=(4, 4, 4), depth=(1, 1, 1), num_heads=(2, 2, 3), window_size=(4, 4, 4)
)
SHVIT = dict(embed_dim=(16, 32, 48), partial_dim=(8, 8, 16), depth=(1, 1, 1), qk_dim=(4, 4, 4))
RESNET = dict(layers=(1, 1, 1, 1), channels=(32, 64, 64, 128), stem_width=16)

# id: (builder, sizes, builder takes img_size, {mechanism swapped in: how many modules})
# A table, one timm model per row (a row may wrap once): `fmt: skip` keeps the formatter from spreading a row
# over six lines.
CASES = {
    "swin": (timm_model("swin_tiny_patch4_window7_224", **SWIN), [(56, 56), (112, 112)], True, {"window": 4}),
    "vit": (timm_model("vit_tiny_patch16_224", **VIT), [(32, 32), (48, 48)], True, {"mhsa": 2}),
    "deit_qk_norm": (timm_model("deit_tiny_patch16_224", **VIT, qk_norm=True), [(32, 32), (48, 48)], True, {"mhsa": 2}),
    "maxvit_tf": (timm_model("maxvit_tiny_tf_224", **MAXVIT), [(64, 64), (128, 128)], True,
                  {"squeeze_excite": 2, "multi_axis": 4}),
    "maxvit_rw": (timm_model("maxvit_nano_rw_256", **MAXVIT), [(64, 64), (128, 128)], True,
                  {"squeeze_excite": 2, "multi_axis": 4}),
    "maxxvit_rmlp": (timm_model("maxxvit_rmlp_nano_rw_256", **MAXVIT), [(64, 64), (128, 128)], True,
                     {"multi_axis": 4}),
    "pvt_v2": (timm_model("pvt_v2_b0", **PVT), [(64, 64), (96, 64)], False, {"spatial_reduction": 2}),
    "pvt_v2_li": (timm_model("pvt_v2_b0", **PVT, linear=True), [(64, 64), (96, 64)], False, {"spatial_reduction": 2}),
    "seresnet": (timm_model("resnet18", **RESNET, block_args=dict(attn_layer="se")), [(32, 32), (40, 48)], False,
               {"squeeze_excite": 4}),
    "ecaresnet": (timm_model("resnet18", **RESNET, block_args=dict(attn_layer="eca")), [(32, 32), (40, 48)], False,
               {"eca": 4}),
    "cbamresnet": (timm_model("resnet18", **RESNET, block_args=dict(attn_layer="cbam")), [(32, 32), (40, 48)], False,
               {"cbam": 4}),
    "gcresnet": (timm_model("resnet18", **RESNET, block_args=dict(attn_layer="gc")), [(32, 32), (40, 48)], False,
               {"global_context": 4}),
    "halonet": (halonet, [(32, 32), (48, 64)], False, {"halo": 2}),
    "convit": (timm_model("convit_tiny", **CONVIT), [(32, 32), (48, 48)], True, {"gated_positional": 2, "mhsa": 1}),
    "crossvit": (timm_model("crossvit_tiny_240", **CROSSVIT), [(48, 48), (96, 96)], True, {"mhsa": 2, "cls_cross": 2}),
    "volo": (volo, [(32, 32), (64, 64)], True, {"outlook": 1, "mhsa": 3, "cls_cross": 2}),
    "davit": (timm_model("davit_tiny", **DAVIT), [(64, 64), (56, 72)], False, {"window": 2, "channel_group": 2}),
    "efficientvit_msra": (timm_model("efficientvit_m0", **EFFICIENTVIT), [(64, 64), (96, 80)], True,
                          {"cascaded_group": 3, "squeeze_excite": 2}),
    "shvit": (timm_model("shvit_s1", **SHVIT), [(64, 64), (96, 80)], False, {"single_head": 2, "squeeze_excite": 2}),
}  # fmt: skip


def build(case: str, size: tuple[int, int]) -> nn.Module:
    builder, _, takes_size, _ = CASES[case]
    model = builder(img_size=size) if takes_size else builder()
    return randomize_(model.to(DT).eval(), std=0.1, seed=0, perturb=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def output_and_input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (grad,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=DT).reshape(y.shape)).sum(), x)
    return y.detach(), grad


@pytest.mark.parametrize("size_index", [0, 1], ids=["default_size", "other_size"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_swap_keeps_the_model_function(case, size_index):
    _, sizes, _, expected = CASES[case]
    size = sizes[size_index]
    original = build(case, size)
    swapped = copy.deepcopy(original)
    report = attnzoo.swap(swapped, strict=True)
    assert sorted(e.mechanism for e in report) == sorted(name for name, n in expected.items() for _ in range(n))
    assert all(e.carried and not e.initialised for e in report)
    classes = {f.cls for f in FAMILIES}
    assert not any(type(m) in classes for m in swapped.modules())  # nothing of timm's attention is left to run
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=DT)
    y0, g0 = output_and_input_grad(original, x)
    y1, g1 = output_and_input_grad(swapped, x)
    assert relative_error(y1, y0) < 1e-8
    assert relative_error(g1, g0) < 1e-8


@pytest.mark.parametrize("case", ["swin", "pvt_v2", "cbamresnet"])
def test_swapped_model_runs_the_mechanisms_it_reports(case):
    """Perturbing one swapped mechanism's weights changes the output: the model computes through them."""
    _, sizes, _, _ = CASES[case]
    model = build(case, sizes[0])
    report = attnzoo.swap(model)
    x = torch.randn(1, 3, *sizes[0], dtype=DT)
    before = model(x)
    mechanisms = [m for m in model.modules() if getattr(m, "mechanism_name", "") == report[0].mechanism]
    assert len(mechanisms) == len(report)
    randomize_(mechanisms[0], std=0.1, seed=5, perturb=True)
    assert relative_error(model(x), before) > 1e-6


@pytest.mark.parametrize("masked, is_causal", [(True, False), (False, True)])
def test_vit_attention_masks_pass_through_the_adapter(masked, is_causal):
    original = build("vit", (32, 32))
    swapped = copy.deepcopy(original)
    attnzoo.swap(swapped)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[..., 0] = True  # every query keeps the class token
    expected = original.forward_features(x, attn_mask=mask, is_causal=is_causal)
    assert relative_error(expected, original.forward_features(x)) > 1e-3  # the mask matters
    assert relative_error(swapped.forward_features(x, attn_mask=mask, is_causal=is_causal), expected) < 1e-8


def test_swin_shifted_block_on_a_padded_map_is_left_alone_and_the_model_still_matches():
    """At 40² (10×10 tokens, window 7) timm pads after the cyclic roll: that block is refused, the rest swapped."""
    original = build("swin", (40, 40))
    swapped = copy.deepcopy(original)
    report = attnzoo.swap(swapped)
    assert [(e.path, e.mechanism) for e in report] == [
        ("layers.0.blocks.0", "window"),
        ("layers.0.blocks.1", None),
        ("layers.1.blocks.0", "window"),
        ("layers.1.blocks.1", "window"),
    ]
    assert "pads after the cyclic roll" in report[1].reason
    x = torch.randn(2, 3, 40, 40, dtype=DT)
    y0, g0 = output_and_input_grad(original, x)
    y1, g1 = output_and_input_grad(swapped, x)
    assert relative_error(y1, y0) < 1e-8 and relative_error(g1, g0) < 1e-8


def test_swapped_swin_follows_set_input_size_with_the_same_window():
    """timm's resize turns the clipped 7×7 stage-2 blocks (shift 0) into shifted ones at 112²; a new window is refused."""
    original = build("swin", (56, 56))
    swapped = copy.deepcopy(original)
    attnzoo.swap(swapped)
    for model in (original, swapped):
        model.set_input_size(img_size=(112, 112), window_size=7)
    assert swapped.layers[1].blocks[1].attn.shift_size == (3, 3)
    x = torch.randn(1, 3, 112, 112, dtype=DT)
    assert relative_error(swapped(x), original(x)) < 1e-8
    with pytest.raises(ValueError, match="window_size=.*swap after set_input_size"):
        swapped.set_input_size(img_size=(224, 224), window_size=8)


def test_swin_to_neighborhood_carries_projections_and_initialises_the_bias():
    original = build("swin", (56, 56))
    model = copy.deepcopy(original)
    report = attnzoo.swap(model, mixer="neighborhood")
    assert [e.mechanism for e in report] == ["neighborhood"] * 4
    for entry in report:
        assert entry.carried == ("proj.bias", "proj.weight", "qkv.bias", "qkv.weight")
        assert entry.initialised == ("rpb",)
        new, old = model.get_submodule(entry.path).attn, original.get_submodule(entry.path).attn
        for name in entry.carried:
            torch.testing.assert_close(new.state_dict()[name], old.state_dict()[name], rtol=0, atol=0)
        assert new.kernel_size == tuple(original.get_submodule(entry.path).window_size)  # Swin's window as kernel
        assert new.num_heads == old.num_heads
    x = torch.randn(2, 3, 56, 56, dtype=DT, requires_grad=True)
    y = model(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert not torch.allclose(y, original(x))  # neighborhoods are not windows


def test_pvt_to_mhsa_fuses_q_and_kv_into_qkv():
    original = build("pvt_v2", (64, 64))
    model = copy.deepcopy(original)
    report = attnzoo.swap(model, mixer="mhsa")
    for entry in report:
        assert entry.carried == ("proj.bias", "proj.weight", "qkv.bias", "qkv.weight") and entry.initialised == ()
        old, new = original.get_submodule(entry.path), model.get_submodule(entry.path).mixer
        assert new.num_heads == old.num_heads
        torch.testing.assert_close(new.qkv.weight, torch.cat([old.q.weight, old.kv.weight]), rtol=0, atol=0)
        torch.testing.assert_close(new.qkv.bias, torch.cat([old.q.bias, old.kv.bias]), rtol=0, atol=0)
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64, dtype=DT))).all()


def test_gate_slots_take_gates_only():
    model = build("seresnet", (32, 32))
    report = attnzoo.swap(model, mixer="eca")
    assert [e.mechanism for e in report] == ["eca"] * 4 and all(e.initialised == ("conv.weight",) for e in report)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32, dtype=DT))).all()
    report = attnzoo.swap(model, mixer="neighborhood")  # the swapped model holds no timm gate any more
    assert report == []
    model = build("seresnet", (32, 32))
    assert all("this slot takes" in e.reason for e in attnzoo.swap(model, mixer="neighborhood"))


def test_mixer_kwargs_override_what_is_taken_from_the_module():
    model = build("swin", (56, 56))
    report = attnzoo.swap(model, mixer="neighborhood", kernel_size=3, rel_pos_bias=False)
    assert all(e.initialised == () for e in report)
    assert model.layers[0].blocks[0].attn.kernel_size == (3, 3)
    assert torch.isfinite(model(torch.randn(1, 3, 56, 56, dtype=DT))).all()


def test_mixer_change_on_a_sequence_slot_takes_sequence_mechanisms_only():
    model = build("vit", (32, 32))
    report = attnzoo.swap(model, mixer="neighborhood")
    assert all(not e.swapped and "layout 'spatial'" in e.reason for e in report)
    with pytest.raises(ValueError, match="blocks.0.attn"):
        attnzoo.swap(model, mixer="neighborhood", strict=True)


class NovelAttention(nn.Module):
    def forward(self, x):
        return x


def test_unsupported_modules_are_listed_and_strict_raises_before_changing_anything():
    from timm.layers.squeeze_excite import SEModule

    model = nn.Sequential(
        nn.Conv2d(3, 32, 1),
        SEModule(32, rd_channels=8),
        SEModule(32, rd_channels=8, add_maxpool=True),
        NovelAttention(),
    ).to(DT)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2 \(.*SEModule: squeeze_excite: add_maxpool=True.*3 \(.*NovelAttention"):
        attnzoo.swap(model, strict=True)
    assert type(model[1]) is SEModule and model.state_dict().keys() == state.keys()
    report = attnzoo.swap(model)
    assert [(e.path, e.mechanism) for e in report] == [("1", "squeeze_excite"), ("2", None), ("3", None)]
    assert isinstance(report[0], SwapEntry) and report[0].original == "timm.layers.squeeze_excite.SEModule"
    assert type(model[2]) is SEModule and type(model[3]) is NovelAttention


def test_bad_arguments_are_named():
    model = build("vit", (32, 32))
    with pytest.raises(ValueError, match="neighbourhood.*did you mean 'neighborhood'"):
        attnzoo.swap(model, mixer="neighbourhood")
    with pytest.raises(ValueError, match="mixer_kwargs"):
        attnzoo.swap(model, kernel_size=3)
    with pytest.raises(TypeError, match="model"):
        attnzoo.swap("vit")


def test_importing_attnzoo_does_not_import_timm():
    code = "import sys, attnzoo; attnzoo.swap; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
