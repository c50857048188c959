"""Backbones: the arena's pluggable-mixer sizes and the papers' published models; ``create``, ``load``, timm registration.

Published configurations (``nat_tiny``, ``dinat_base``, …; ``list_models()``) are built with
``create(name, num_classes=1000, in_chans=3, img_size=224, **overrides)``; ``model_info(name)`` gives the paper's
table (parameters, MACs at 224², ImageNet-1k top-1, source) next to the figures measured on the model.
The arena sizes take a mixer per stage:

>>> model = create("tiny", mixers=("neighborhood", "neighborhood", "mhsa", "mhsa"), num_classes=10, in_chans=1)
>>> feats = model.forward_features(torch.randn(2, 1, 28, 28))   # [(2,14,14,32), (2,7,7,64), (2,4,4,128), (2,2,2,256)]

When timm is installed, every model is registered with it as ``attnzoo_<name>`` so that
``timm.create_model("attnzoo_tiny", mixers="window", num_classes=10, in_chans=1)`` and
``timm.create_model("attnzoo_nat_tiny", features_only=True)`` work. Registration happens when
timm is imported (at once if it already is), so importing this package never pays for importing timm.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from . import agent_swin, biformer, cswin, hornet, litv2, nat, smt, van  # noqa: F401  (registers the published configurations of each family)
from ._paper import PAPER_MODELS, PaperModel, PaperTable, measure, paper_spec
from .backbone import SIZES, Backbone, BackboneSize, Block, MixerAdapter, stage_defaults
from .saving import CONFIG_FILE, WEIGHTS_FILE, atomic_write, load, model_config, save

__all__ = [
    "create",
    "load",
    "save",
    "model_config",
    "list_models",
    "list_families",
    "model_info",
    "ModelInfo",
    "PaperModel",
    "PaperTable",
    "Backbone",
    "BackboneSize",
    "Block",
    "MixerAdapter",
    "SIZES",
    "stage_defaults",
    "atomic_write",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

MixerKwargs = Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None


def list_models(family: str | None = None) -> list[str]:
    """Names of every buildable model: the arena sizes (family ``"arena"``) and the published configurations."""
    arena = sorted(SIZES) if family in (None, "arena") else []
    return arena + [n for n, spec in PAPER_MODELS.items() if family in (None, spec.family)]


def list_families() -> list[str]:
    """Families of the published configurations (``"nat"``, ``"dinat"``, …), sorted; ``"arena"`` is not one."""
    return sorted({spec.family for spec in PAPER_MODELS.values()})


@dataclass(frozen=True)
class ModelInfo:
    """A published configuration: its paper's table and the figures measured on the model built here.

    ``paper_params_m`` / ``paper_gmacs`` / ``top1`` come from ``source``; ``params`` / ``macs`` are counted on the
    model at ``img_size`` 224 with a 1000-class head (``attnzoo.models._paper`` states the convention). ``note``
    documents any known difference.
    """

    name: str
    family: str
    source: str
    reference: str
    paper_params_m: float
    paper_gmacs: float
    top1: float
    params: int
    macs: int
    note: str

    @property
    def params_error(self) -> float:
        """Relative difference of the measured parameters from the paper's."""
        return self.params / (self.paper_params_m * 1e6) - 1.0

    @property
    def macs_error(self) -> float:
        """Relative difference of the measured MACs from the paper's."""
        return self.macs / (self.paper_gmacs * 1e9) - 1.0


def model_info(name: str) -> ModelInfo:
    """The paper's table for published model ``name`` with the parameters and MACs measured on it."""
    if name in SIZES:
        raise ValueError(
            f"name={name!r} is an arena size with no paper table; published models: {list_models()[len(SIZES) :]}"
        )
    spec = paper_spec(name, list_models())
    measured = measure(name)
    table = spec.table
    return ModelInfo(
        name=name,
        family=spec.family,
        source=table.source,
        reference=spec.reference,
        paper_params_m=table.params_m,
        paper_gmacs=table.gmacs,
        top1=table.top1,
        params=measured.params,
        macs=measured.macs,
        note=spec.note,
    )


def _per_stage(value: Any, stages: int, what: str) -> list:
    if isinstance(value, (str, Mapping)) or value is None:
        return [value] * stages
    items = list(value)
    if len(items) != stages:
        raise ValueError(f"{what}={value!r} must name one entry or {stages} (one per stage), got {len(items)}")
    return items


def create(
    name: str = "tiny",
    mixers: str | Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
    mixer_kwargs: MixerKwargs = None,
    channel_mixer: str | Sequence[str | None] | None = None,
    channel_mixer_kwargs: MixerKwargs = None,
    **overrides: Any,
) -> Backbone | PaperModel:
    """Build model ``name``: an arena size (``"tiny"``, ``"small"``) or a published configuration (``list_models()``).

    Published configurations: ``create(name, num_classes=1000, in_chans=3, img_size=224, **overrides)``; overrides
    replace arguments of the family's model class (e.g. ``kernel_size=9``, ``depths=…``) and are checked against every
    stage. Arena sizes: ``mixers`` (one name for all stages, or one per stage; default ``"neighborhood"``) and
    ``mixer_kwargs`` (``None``, one dict for every stage, or one dict or ``None`` per stage); ``channel_mixer``:
    ``None`` (the MLP), or a ``slot="channel"`` mechanism name replacing the MLP of every block (e.g.
    ``"convolutional_glu"``), or one name/``None`` per stage, with ``channel_mixer_kwargs`` like ``mixer_kwargs``;
    ``num_classes`` defaults to 10 and ``img_size`` to the size's native resolution (28 for tiny, 224 for small).
    """
    if "size" in overrides:  # the v0.1 spelling of ``name``
        warnings.warn(
            "models.create(size=...) is deprecated; pass the model name first or as name=",
            DeprecationWarning,
            stacklevel=2,
        )
        name = overrides.pop("size")
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} must be a model name (str); attnzoo.models.list_models() lists them")
    if name in PAPER_MODELS:
        if (
            mixers is not None
            or mixer_kwargs is not None
            or channel_mixer is not None
            or channel_mixer_kwargs is not None
        ):
            raise TypeError(
                f"{name!r} is a published configuration: mixers, mixer_kwargs, channel_mixer and channel_mixer_kwargs "
                f"apply to the arena sizes {sorted(SIZES)}"
            )
        num_classes = 1000 if num_classes is None else num_classes
        img_size = 224 if img_size is None else img_size
        model = PAPER_MODELS[name].builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
        model.config = {
            "name": name,
            "num_classes": num_classes,
            "in_chans": in_chans,
            "img_size": img_size,
            **overrides,
        }
        return model
    if name not in SIZES:
        paper_spec(name, list_models())  # raises, suggesting close names
    if overrides:
        raise TypeError(f"unexpected arguments {sorted(overrides)} for arena size {name!r}")
    mixers = "neighborhood" if mixers is None else mixers
    num_classes = 10 if num_classes is None else num_classes
    spec = SIZES[name]
    stages = spec.num_stages
    names = _per_stage(mixers, stages, "mixers")
    for mixer in names:
        if not isinstance(mixer, str):
            raise TypeError(f"mixers must hold mechanism names (str), got {mixer!r}")
    per_stage = _per_stage(mixer_kwargs, stages, "mixer_kwargs")
    if not all(k is None or isinstance(k, Mapping) for k in per_stage):
        raise TypeError(f"mixer_kwargs={mixer_kwargs!r} must be None, a dict, or one dict (or None) per stage")
    kwargs = [dict(k or {}) for k in per_stage]
    channel_names = _per_stage(channel_mixer, stages, "channel_mixer")
    for channel in channel_names:
        if channel is not None and not isinstance(channel, str):
            raise TypeError(f"channel_mixer must hold mechanism names (str) or None, got {channel!r}")
    channel_kwargs = [dict(k or {}) for k in _per_stage(channel_mixer_kwargs, stages, "channel_mixer_kwargs")]
    img_size = spec.img_size if img_size is None else img_size
    model = Backbone(
        names,
        dims=spec.dims,
        depths=spec.depths,
        stem_stride=spec.stem_stride,
        mlp_ratio=spec.mlp_ratio,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mixer_kwargs=kwargs,
        channel_mixers=channel_names,
        channel_kwargs=channel_kwargs,
    )
    model.config = {
        "size": name,
        "mixers": list(names),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": img_size,
        "mixer_kwargs": kwargs,
        "channel_mixer": list(channel_names),
        "channel_mixer_kwargs": channel_kwargs,
    }
    return model


def _register_with_timm() -> None:
    from timm.models import register_model

    def entry(name: str):
        def build(pretrained: bool = False, **kwargs: Any) -> Backbone | PaperModel:
            if pretrained:
                raise ValueError(f"attnzoo_{name} has no pretrained weights; train one with `attnzoo train`")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
            features_only = kwargs.pop("features_only", False)
            out_indices = kwargs.pop("out_indices", None)
            model = create(name, **kwargs)
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            if not features_only:
                return model
            if not isinstance(model, PaperModel):
                raise ValueError(f"features_only: attnzoo_{name} returns its stage maps from forward_features already")
            from timm.models._features import FeatureGetterNet

            stages = len(model.stages)
            return FeatureGetterNet(model, out_indices=tuple(range(stages)) if out_indices is None else out_indices)

        build.__name__ = f"attnzoo_{name}"
        build.__qualname__ = build.__name__
        if name in SIZES:
            build.__doc__ = f"attnzoo {name} backbone with a pluggable mixer per stage (``mixers=``)."
        else:
            build.__doc__ = f"{name} as published ({PAPER_MODELS[name].table.source})."
        return build

    for name in list_models():
        fn = entry(name)
        globals()[fn.__name__] = fn
        register_model(fn)


class _RegisterWhenTimmLoads:
    """Meta-path finder that lets timm load as usual, then registers our entry points (timm costs seconds to import)."""

    finding = False

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name != "timm" or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)  # whichever finder would have found timm
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module: Any) -> None:
                exec_module(module)
                _register_with_timm()

            spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
