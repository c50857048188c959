"""Published backbones (attnzoo.models.create("nat_tiny") …): the papers' tables, structure read from the official
code, the timm API, checkpoints (attnzoo's own and the official NAT/DiNAT key names), and bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo import models
from attnzoo.cli import main
from attnzoo.models._paper import PAPER_MODELS
from attnzoo.models.nat import load_official_state_dict

PAPER = sorted(PAPER_MODELS)

# From the official code (SHI-Labs/Neighborhood-Attention-Transformer classification/nat.py, dinat.py), not from ours.
OFFICIAL_NAT = {
    "mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3),
    "tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3),
    "small": dict(depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2),
    "base": dict(depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2),
}
OFFICIAL_LAYER_SCALE = {"nat_small", "nat_base", "dinat_base"}
OFFICIAL_DINAT_DILATIONS = {
    "mini": [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    "tiny": [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1, 1, 1, 1, 1]],
}
OFFICIAL_DINAT_DILATIONS["small"] = OFFICIAL_DINAT_DILATIONS["base"] = OFFICIAL_DINAT_DILATIONS["tiny"]


def build_meta(name: str, **kwargs):
    with torch.device("meta"):
        return models.create(name, **kwargs)


@pytest.mark.parametrize("name", PAPER)
def test_params_and_macs_match_the_paper_table(name):
    """Parameters within 1 % and MACs within 3 % of the paper; a MAC figure that cannot match is documented in
    model_info's note with its exact measured difference, which must stay as documented."""
    info, spec = models.model_info(name), PAPER_MODELS[name]
    for error, tolerance, documented in (
        (info.params_error, 0.01, spec.documented_params_error),
        (info.macs_error, 0.03, spec.documented_macs_error),
    ):
        if documented is None:
            assert abs(error) <= tolerance, (info.params, info.macs, info.paper_params_m, info.paper_gmacs)
        else:
            assert abs(documented) > tolerance and info.note, "a documented difference must be one the tolerance misses"
            assert round(error, 4) == documented, (error, info.note)
    assert info.top1 > 50 and "ImageNet-1k" in info.source


def test_macs_count_attention_with_the_engine_formula():
    """Removing attention's share (4·N·k²·C per layer, counted by hand) leaves the dense layers' MACs unchanged."""
    depths, dims, grids = (3, 4, 6, 5), (64, 128, 256, 512), (56, 28, 14, 7)
    attention = sum(d * 2 * g * g * 49 * c for d, c, g in zip(depths, dims, grids))  # QKᵀ and PV: N·k²·C MACs each
    dense = models.model_info("nat_mini").macs - attention
    ratio = 3
    linear = sum(d * g * g * (c * 3 * c + c * c + 2 * ratio * c * c) for d, c, g in zip(depths, dims, grids))
    stem = 112 * 112 * 3 * 9 * 32 + 56 * 56 * 32 * 9 * 64
    downsample = sum(g * g * c * 9 * 2 * c for g, c in zip(grids[1:], dims[:-1]))
    assert dense == linear + stem + downsample + 512 * 1000


@pytest.mark.parametrize("size", list(OFFICIAL_NAT))
@pytest.mark.parametrize("family", ["nat", "dinat"])
def test_structure_follows_the_official_definition(family, size):
    name = f"{family}_{size}"
    model = build_meta(name)
    cfg = OFFICIAL_NAT[size]
    assert [len(s.blocks) for s in model.stages] == cfg["depths"]
    for i, stage in enumerate(model.stages):
        attn = [b.attn for b in stage.blocks]
        assert {a.dim for a in attn} == {cfg["embed_dim"] * 2**i}
        assert {a.num_heads for a in attn} == {cfg["num_heads"][i]}
        assert {a.kernel_size for a in attn} == {(7, 7)}
        assert {b.mlp.fc1.out_features for b in stage.blocks} == {cfg["embed_dim"] * 2**i * cfg["mlp_ratio"]}
        assert all(a.rpb is not None and a.rpb.shape[1:] == (13, 13) for a in attn)
        dilations = [a.dilation[0] for a in attn]
        assert dilations == (OFFICIAL_DINAT_DILATIONS[size][i] if family == "dinat" else [1] * cfg["depths"][i])
        assert all((b.gamma1 is not None) == (name in OFFICIAL_LAYER_SCALE) for b in stage.blocks)


OFFICIAL_VAN = {  # Visual-Attention-Network/VAN-Classification models/van.py
    "van_b0": dict(embed_dims=[32, 64, 160, 256], mlp_ratios=[8, 8, 4, 4], depths=[3, 3, 5, 2]),
    "van_b1": dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[2, 2, 4, 2]),
    "van_b2": dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 3, 12, 3]),
    "van_b3": dict(embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], depths=[3, 5, 27, 3]),
}


@pytest.mark.parametrize("name", list(OFFICIAL_VAN))
def test_van_structure_follows_the_official_definition(name):
    model, cfg = build_meta(name), OFFICIAL_VAN[name]
    assert [len(s.blocks) for s in model.stages] == cfg["depths"]
    for stage, dim, ratio in zip(model.stages, cfg["embed_dims"], cfg["mlp_ratios"]):
        for block in stage.blocks:
            lka = block.attn
            assert (lka.conv0.kernel_size, lka.conv0.groups) == ((5, 5), dim)
            assert (lka.conv_spatial.kernel_size, lka.conv_spatial.dilation, lka.conv_spatial.padding) == (
                (7, 7),
                (3, 3),
                (9, 9),
            )
            assert block.mlp.fc1.out_channels == dim * ratio and block.mlp.dwconv.groups == dim * ratio
        assert stage.norm.normalized_shape == (dim,) and stage.norm.eps == 1e-6
    assert model.stem.proj.kernel_size == (7, 7) and model.stem.proj.stride == (4, 4)


@pytest.mark.parametrize(
    "name",
    ["nat_mini", "van_b0", "cswin_tiny", "hornet_tiny", "biformer_tiny", "smt_tiny", "litv2_small", "agent_swin_tiny"],
)
def test_each_family_runs_forward_and_backward(name):
    model = models.create(name, num_classes=3, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 224, 224)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    maps = model.eval().stage_outputs(x[:1])
    assert [tuple(m.shape[1:]) for m in maps] == [
        (f["num_chs"], 224 // f["reduction"], 224 // f["reduction"]) for f in model.feature_info
    ]


def test_feature_maps_head_and_classifier_reset():
    model = models.create("dinat_mini", num_classes=10, depths=(1, 2, 1, 1)).eval()
    x = torch.randn(2, 3, 224, 224)
    maps = model.stage_outputs(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
    features = model.forward_features(x)
    assert features.shape == (2, 7, 7, 512)
    torch.testing.assert_close(model(x), model.forward_head(features))
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean(dim=(1, 2)))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["first_conv"] == "stem.proj.0" and cfg["classifier"] == "head"
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


def test_timm_create_model_and_features_only():
    timm = pytest.importorskip("timm")
    assert {f"attnzoo_{n}" for n in PAPER} <= set(timm.list_models("attnzoo_*"))
    model = timm.create_model("attnzoo_nat_mini", num_classes=7, depths=(1, 1, 1, 1))
    assert isinstance(model, models.PaperModel) and model.num_classes == 7
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == "bicubic"
    features = timm.create_model("attnzoo_nat_mini", features_only=True, out_indices=(1, 3), depths=(1, 1, 1, 1))
    assert features.feature_info.channels() == [128, 512] and features.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 128, 28, 28), (1, 512, 7, 7)]
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("attnzoo_nat_tiny", pretrained=True)


def test_save_and_load_round_trip(tmp_path):
    model = models.create("nat_small", num_classes=4, depths=(1, 1, 2, 1)).eval()
    models.save(model, tmp_path)
    loaded = models.load(tmp_path)
    assert type(loaded) is type(model) and [len(s.blocks) for s in loaded.stages] == [1, 1, 2, 1]
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def official_state_dict(cfg: dict, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Keys and shapes of the official ``NAT`` module (nat.py: patch_embed / levels.i.blocks.j / levels.i.downsample),
    written from the official definitions; random values (shapes only on the meta device)."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}
    e, k = cfg["embed_dim"], cfg["kernel_size"]
    shapes.update(
        {
            "patch_embed.proj.0.weight": (e // 2, 3, 3, 3),
            "patch_embed.proj.0.bias": (e // 2,),
            "patch_embed.proj.1.weight": (e, e // 2, 3, 3),
            "patch_embed.proj.1.bias": (e,),
            "patch_embed.norm.weight": (e,),
            "patch_embed.norm.bias": (e,),
        }
    )
    for i, depth in enumerate(cfg["depths"]):
        c, h = e * 2**i, cfg["num_heads"][i]
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.rpb": (h, 2 * k - 1, 2 * k - 1),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (cfg["mlp_ratio"] * c, c),
                    p + "mlp.fc1.bias": (cfg["mlp_ratio"] * c,),
                    p + "mlp.fc2.weight": (c, cfg["mlp_ratio"] * c),
                    p + "mlp.fc2.bias": (c,),
                }
            )
            if cfg.get("layer_scale"):
                shapes.update({p + "gamma1": (c,), p + "gamma2": (c,)})
        if i < len(cfg["depths"]) - 1:
            p = f"levels.{i}.downsample."
            shapes.update(
                {p + "reduction.weight": (2 * c, c, 3, 3), p + "norm.weight": (2 * c,), p + "norm.bias": (2 * c,)}
            )
    last = e * 2 ** (len(cfg["depths"]) - 1)
    shapes.update({"norm.weight": (last,), "norm.bias": (last,), "head.weight": (1000, last), "head.bias": (1000,)})
    if device == "meta":
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    return {key: torch.randn(shape, generator=g) * 0.1 for key, shape in shapes.items()}


def official_forward(sd: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """The official NAT forward (nat.py), written with torch ops and natten's na2d (requires rpb = 0)."""
    na2d = pytest.importorskip("natten.functional").na2d
    F = torch.nn.functional
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    x = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=2, padding=1)
    x = F.conv2d(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"], stride=2, padding=1)
    x = ln(x.permute(0, 2, 3, 1), "patch_embed.norm")
    for i, depth in enumerate(cfg["depths"]):
        h = cfg["num_heads"][i]
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            b, hh, ww, c = x.shape
            q, k, v = lin(ln(x, p + "norm1"), p + "attn.qkv").reshape(b, hh, ww, 3, h, c // h).unbind(3)
            a = na2d(q, k, v, kernel_size=cfg["kernel_size"], dilation=cfg["dilations"][i][j]).reshape(b, hh, ww, c)
            a = lin(a, p + "attn.proj")
            x = x + (sd[p + "gamma1"] * a if cfg.get("layer_scale") else a)
            m = lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
            x = x + (sd[p + "gamma2"] * m if cfg.get("layer_scale") else m)
        if i < len(cfg["depths"]) - 1:
            p = f"levels.{i}.downsample."
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "reduction.weight"], stride=2, padding=1)
            x = ln(x.permute(0, 2, 3, 1), p + "norm")
    return lin(ln(x, "norm").mean(dim=(1, 2)), "head")


def test_official_state_dict_loads_through_the_key_map_and_computes_the_official_forward():
    cfg = dict(
        depths=[2, 2, 2, 1],
        num_heads=[2, 4, 8, 16],
        embed_dim=64,
        mlp_ratio=2,
        kernel_size=3,
        dilations=[[1, 4], [1, 2], [1, 2], [1]],
        layer_scale=1e-5,
    )
    sd = official_state_dict(cfg)
    for key in [k for k in sd if k.endswith("attn.rpb")]:
        sd[key] = torch.zeros_like(sd[key])  # natten ≥ 0.20 (the oracle) has no relative position bias
    model = models.create(
        "dinat_base",
        img_size=112,
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        embed_dim=64,
        mlp_ratio=2.0,
        kernel_size=3,
        dilations=cfg["dilations"],
    ).eval()
    load_official_state_dict(model, {"model": sd})
    torch.testing.assert_close(model.stages[2].downsample.reduction.weight, sd["levels.1.downsample.reduction.weight"])
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, cfg, x), rtol=1e-4, atol=1e-4)
    del sd["levels.0.blocks.0.gamma1"]
    with pytest.raises(ValueError, match=r"missing \['stages.0.blocks.0.gamma1'\]"):
        load_official_state_dict(model, sd)


def test_full_official_state_dict_of_every_published_size_loads():
    for size, cfg in OFFICIAL_NAT.items():
        for family in ("nat", "dinat"):
            name = f"{family}_{size}"
            sd = official_state_dict({**cfg, "kernel_size": 7, "layer_scale": name in OFFICIAL_LAYER_SCALE}, "meta")
            load_official_state_dict(build_meta(name), sd)  # raises on any missing, unexpected or mis-shaped key


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"name='nat_tini' is not a known model; did you mean 'nat_tiny'"):
        models.create("nat_tini")
    with pytest.raises(ValueError, match=r"did you mean 'dinat_small'"):
        models.model_info("dinat_smal")
    with pytest.raises(ValueError, match="arena size with no paper table"):
        models.model_info("tiny")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kernel_size=9), r"stage 3 \(7×7 tokens\): kernel_size=9 with dilation 1"),
        (dict(img_size=160), r"stage 0 \(40×40 tokens\): kernel_size=7 with dilation 8 spans 56"),
        (dict(num_heads=(2, 4, 6, 16)), r"stage 2: num_heads=6 must be a positive int that divides the width 256"),
        (
            dict(dilations=[[1, 9, 1], [1] * 4, [1] * 18, [1] * 5]),
            r"stage 0 \(56×56 tokens\): kernel_size=7 with dilation 9",
        ),
        (
            dict(dilations=[[1, 8], [1] * 4, [1] * 18, [1] * 5]),
            r"stage 0: dilations=\[1, 8\] must have one entry per block \(3\)",
        ),
    ],
)
def test_overrides_that_break_the_configuration_name_stage_argument_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_meta("dinat_tiny", **overrides)


def test_models_command_prints_paper_and_measured_figures(capsys):
    assert main(["models", "--family", "nat"]) == 0
    out = capsys.readouterr().out
    info = models.model_info("nat_tiny")
    assert "nat_tiny" in out and "dinat_tiny" not in out
    assert f"{info.params / 1e6:.2f}M" in out and f"{info.macs / 1e9:.2f}" in out
    assert main(["models", "--family", "nope"]) == 2


OFFICIAL_CSWIN = {  # microsoft/CSWin-Transformer models/cswin.py
    "cswin_tiny": dict(embed_dim=64, depth=[1, 2, 21, 1], split_size=[1, 2, 7, 7], num_heads=[2, 4, 8, 16]),
    "cswin_small": dict(embed_dim=64, depth=[2, 4, 32, 2], split_size=[1, 2, 7, 7], num_heads=[2, 4, 8, 16]),
    "cswin_base": dict(embed_dim=96, depth=[2, 4, 32, 2], split_size=[1, 2, 7, 7], num_heads=[4, 8, 16, 32]),
}


@pytest.mark.parametrize("name", list(OFFICIAL_CSWIN))
def test_cswin_structure_follows_the_official_definition(name):
    model, cfg = build_meta(name), OFFICIAL_CSWIN[name]
    assert [len(s.blocks) for s in model.stages] == cfg["depth"]
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            attn = block.attn
            assert (attn.dim, attn.num_heads, attn.window_size) == (
                cfg["embed_dim"] * 2**i,
                cfg["num_heads"][i],
                cfg["split_size"][i],
            )
            assert attn.last_stage == (i == 3) and attn.qkv.bias is not None
            assert block.mlp.fc1.out_features == 4 * attn.dim
    assert (model.stem.conv.kernel_size, model.stem.conv.stride, model.stem.conv.padding) == ((7, 7), (4, 4), (2, 2))


def test_hornet_tiny_follows_the_official_definition():
    """raoyongming/HorNet hornet.py hornet_tiny_7x7: base_dim 64, depths 2/3/18/2, gnconv orders 2..5, 7×7, s = 1/3."""
    model = build_meta("hornet_tiny")
    assert [len(s.blocks) for s in model.stages] == [2, 3, 18, 2]
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            g = block.gnconv
            assert (g.dim, g.order, g.kernel_size, g.scale) == (64 * 2**i, i + 2, 7, pytest.approx(1 / 3))
            assert g.dims == [64 * 2**i // 2**k for k in range(i + 2)][::-1]  # official: dim // 2**i, reversed
    assert model.stem.conv.kernel_size == (4, 4) and model.stages[1].downsample.conv.kernel_size == (2, 2)
    assert model.norm_after_pool and model.norm.eps == 1e-6


OFFICIAL_BIFORMER = {  # rayleizhu/BiFormer models/biformer.py
    "biformer_tiny": dict(depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512]),
    "biformer_small": dict(depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512]),
    "biformer_base": dict(depth=[4, 4, 18, 4], embed_dim=[96, 192, 384, 768]),
}


@pytest.mark.parametrize("name", list(OFFICIAL_BIFORMER))
def test_biformer_structure_follows_the_official_definition(name):
    """topks 1, 4, 16, -2; n_win 7; qk_dims = widths; head_dim 32; mlp ratio 3; last stage AttentionLePE (8 heads)."""
    from attnzoo.models.biformer import AttentionLePE

    model, cfg = build_meta(name), OFFICIAL_BIFORMER[name]
    assert [len(s.blocks) for s in model.stages] == cfg["depth"]
    for i, (stage, dim) in enumerate(zip(model.stages, cfg["embed_dim"])):
        for block in stage.blocks:
            assert block.pos_embed.kernel_size == (3, 3) and block.mlp.fc1.out_features == 3 * dim
            if i < 3:
                bra = block.attn
                assert (bra.num_windows, bra.topk, bra.qk_dim, bra.num_heads) == (7, [1, 4, 16][i], dim, dim // 32)
                assert bra.lepe.kernel_size == (5, 5) and bra.qkv.out_features == 3 * dim
            else:
                assert (
                    isinstance(block.attn, AttentionLePE) and block.attn.num_heads == 8 and block.attn.qkv.bias is None
                )


@pytest.mark.parametrize("name, depths", [("smt_tiny", [2, 2, 8, 1]), ("smt_small", [3, 4, 18, 2])])
def test_smt_hybrid_layout_follows_the_official_definition(name, depths):
    """models/smt.py: modulation in stages 0-1 and even blocks of stage 2; attention (8 / 16 heads) elsewhere;
    mlp ratios 4, 4, 4, 2; SAM with 4 heads (3/5/7/9 convs) and expansion 2; qkv bias."""
    from attnzoo.models.biformer import AttentionLePE

    model = build_meta(name)
    assert [len(s.blocks) for s in model.stages] == depths
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            dim = 64 * 2**i
            assert block.mlp.fc1.out_features == dim * [4, 4, 4, 2][i]
            if i < 2 or (i == 2 and j % 2 == 0):
                sam = block.attn
                assert [c.kernel_size[0] for c in sam.local_convs] == [3, 5, 7, 9] and sam.proj0.out_channels == 2 * dim
                assert sam.v.bias is not None
            else:
                assert isinstance(block.attn, AttentionLePE) and block.attn.num_heads == {2: 8, 3: 16}[i]
                assert block.attn.lepe.kernel_size == (3, 3)


def test_litv2_deformable_conv_matches_torchvision():
    """DTM's deformable conv against torchvision.ops.deform_conv2d, with offsets that leave the map."""
    ops = pytest.importorskip("torchvision.ops")
    from attnzoo.models.litv2 import deform_conv2d_stride_k

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 6, generator=g, dtype=torch.float64)
    offset = 3 * torch.randn(2, 8, 4, 3, generator=g, dtype=torch.float64)
    weight, bias = (
        torch.randn(7, 5, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(7, generator=g, dtype=torch.float64),
    )
    expected = ops.deform_conv2d(x, offset, weight, bias, stride=2)
    torch.testing.assert_close(deform_conv2d_stride_k(x, offset, weight, bias), expected, rtol=1e-10, atol=1e-10)


def test_litv2_small_follows_the_official_definition():
    """configs/litv2-small.yaml: 96, depths 2/2/6/2, heads 3/6/12/24, alpha 0.9, LOCAL_WS 0/0/2/1, has_msa 0/0/1/1."""
    model = build_meta("litv2_small")
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            assert block.mlp.fc1.out_features == 4 * 96 * 2**i
            if i < 2:
                assert block.attn is None
            else:
                hilo = block.attn
                assert (hilo.num_heads, hilo.window_size, hilo.alpha) == ([3, 6, 12, 24][i], [0, 0, 2, 1][i], 0.9)
        if i > 0:
            assert stage.downsample.weight.shape == (2 * 96 * 2 ** (i - 1), 96 * 2 ** (i - 1), 2, 2)
            assert stage.downsample.conv_offset.out_channels == 8


def test_agent_swin_tiny_follows_the_official_definition():
    """cfgs/agent_swin_t.yaml: 96, depths 2/2/6/2, heads 3/6/12/24, AAAB, agents 9-16-49-49, window 56 → whole map."""
    model = build_meta("agent_swin_tiny")
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    grids = [56, 28, 14, 7]
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            attn = block.attn
            assert attn.num_heads == [3, 6, 12, 24][i]
            if i < 3:
                assert (attn.num_agents, attn.input_resolution) == ([9, 16, 49][i], (grids[i], grids[i]))
            else:
                assert attn.window_size == (7, 7) and attn.shift_size == (0, 0)
        if i > 0:
            assert (
                stage.downsample.reduction.in_features == 4 * 96 * 2 ** (i - 1)
                and stage.downsample.reduction.bias is None
            )
    assert "padded canvas" in models.model_info("agent_swin_tiny").note
