"""Backbones with a pluggable token mixer per stage: ``create``, ``load`` and timm registration.

>>> model = create("tiny", mixers=("neighborhood", "neighborhood", "mhsa", "mhsa"), num_classes=10, in_chans=1)
>>> feats = model.forward_features(torch.randn(2, 1, 28, 28))   # [(2,14,14,32), (2,7,7,64), (2,4,4,128), (2,2,2,256)]

When timm is installed, ``attnzoo_tiny`` and ``attnzoo_small`` are registered with it so that
``timm.create_model("attnzoo_tiny", mixers="window", num_classes=10, in_chans=1)`` works. Registration happens when
timm is imported (at once if it already is), so importing this package never pays for importing timm.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from ._io import atomic_write, tensor_digest
from .backbone import SIZES, Backbone, BackboneSize, Block, MixerAdapter, stage_defaults

__all__ = [
    "create", "load", "save", "model_config", "list_models", "Backbone", "BackboneSize", "Block", "MixerAdapter",
    "SIZES", "stage_defaults", "atomic_write", "CONFIG_FILE", "WEIGHTS_FILE",
]  # fmt: skip

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_FORMAT = "attnzoo-model-1"

MixerKwargs = Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None


def list_models() -> list[str]:
    """Names of the backbone sizes."""
    return sorted(SIZES)


def _per_stage(value: Any, stages: int, what: str) -> list:
    if isinstance(value, (str, Mapping)) or value is None:
        return [value] * stages
    items = list(value)
    if len(items) != stages:
        raise ValueError(f"{what}={value!r} must name one entry or {stages} (one per stage), got {len(items)}")
    return items


def create(
    size: str = "tiny",
    mixers: str | Sequence[str] = "neighborhood",
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int | None = None,
    mixer_kwargs: MixerKwargs = None,
) -> Backbone:
    """Build backbone ``size`` (``"tiny"`` or ``"small"``) with ``mixers`` (one name for all stages, or one per stage).

    ``mixer_kwargs``: ``None``, one dict for every stage, or a sequence with one dict (or ``None``) per stage.
    ``img_size`` defaults to the size's native resolution (28 for tiny, 224 for small).
    """
    if not isinstance(size, str) or size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {list_models()}")
    spec = SIZES[size]
    stages = len(spec.dims)
    names = _per_stage(mixers, stages, "mixers")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"mixers must hold mechanism names (str), got {name!r}")
    per_stage = _per_stage(mixer_kwargs, stages, "mixer_kwargs")
    if not all(k is None or isinstance(k, Mapping) for k in per_stage):
        raise TypeError(f"mixer_kwargs={mixer_kwargs!r} must be None, a dict, or one dict (or None) per stage")
    kwargs = [dict(k or {}) for k in per_stage]
    img_size = spec.img_size if img_size is None else img_size
    model = Backbone(
        names, dims=spec.dims, depths=spec.depths, stem_stride=spec.stem_stride, mlp_ratio=spec.mlp_ratio,
        num_classes=num_classes, in_chans=in_chans, img_size=img_size, mixer_kwargs=kwargs,
    )  # fmt: skip
    model.config = {
        "size": size, "mixers": list(names), "num_classes": num_classes, "in_chans": in_chans,
        "img_size": img_size, "mixer_kwargs": kwargs,
    }  # fmt: skip
    return model


def model_config(model: Backbone) -> dict[str, Any]:
    """The ``create`` arguments that rebuild ``model`` (JSON-serialisable)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model was not built by attnzoo.models.create, so it has no config to save")
    return json.loads(json.dumps(config))


def save(model: Backbone, directory: str | Path) -> None:
    """Write ``model.json`` (config) and ``model.safetensors`` (weights) into ``directory``, each atomically.

    The weights file's metadata holds a SHA-256 over every tensor and the ``model.json`` text, checked by ``load``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model_config(model), indent=1)

    def write_weights(path: Path) -> None:
        save_model(model, str(path))  # drops aliased tensors; the digest covers exactly what it kept
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = {"format": WEIGHTS_FORMAT, "sha256": tensor_digest(tensors, config)}
        save_model(model, str(path), metadata=metadata)

    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(config))
    atomic_write(directory / WEIGHTS_FILE, write_weights)


def _read_config(path: Path) -> dict[str, Any]:
    """``model.json`` as ``create`` keyword arguments, or a ValueError naming the file and the broken rule."""
    try:
        text = path.read_text()
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    allowed = {"size", "mixers", "num_classes", "in_chans", "img_size", "mixer_kwargs"}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of create() arguments, got {type(config).__name__}")
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return config


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """The trained model of a run folder (``model.json`` + ``model.safetensors``), in eval mode.

    Both files are checked against the SHA-256 written by ``save``; every error names the file and what is wrong.
    """
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a finished attnzoo run folder")
    config = _read_config(config_path)
    try:
        model = create(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} does not describe a model: {exc}") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{weights} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if "sha256" not in metadata:
        raise ValueError(f"{weights} has no SHA-256 (written by an older attnzoo); save the model again")
    # save_model drops tensors that share memory: compare against the state dict's stored names only.
    expected = {k: v for k, v in model.state_dict().items() if k in tensors}
    missing = sorted(set(model.state_dict()) - set(tensors) - _shared_names(model))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {config_path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{weights} does not fit {config_path}: shape mismatch {'; '.join(shapes[:5])}")
    if tensor_digest(tensors, config_path.read_text()) != metadata["sha256"]:
        raise ValueError(f"{weights} or {config_path} is corrupt or was edited (SHA-256 mismatch)")
    load_model(model, str(weights), strict=True)
    return model.to(map_location).eval()


def _shared_names(model: Backbone) -> set[str]:
    """State-dict names that alias another entry's storage (saved once by ``save_model``)."""
    seen: dict[tuple[int, int], str] = {}
    shared = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            shared.add(name)
        seen[key] = name
    return shared


def _register_with_timm() -> None:
    from timm.models import register_model

    def entry(size: str):
        def build(pretrained: bool = False, **kwargs: Any) -> Backbone:
            if pretrained:
                raise ValueError(f"attnzoo_{size} has no pretrained weights; train one with `attnzoo train`")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
            model = create(size, **kwargs)
            return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

        build.__name__ = f"attnzoo_{size}"
        build.__qualname__ = build.__name__
        build.__doc__ = f"attnzoo {size} backbone with a pluggable mixer per stage (``mixers=``)."
        return build

    for size in SIZES:
        fn = entry(size)
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
