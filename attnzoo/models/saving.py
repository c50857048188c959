"""Saving and loading models, and the file primitives every checkpoint writer uses.

``save`` / ``load`` write and read a model folder (``model.json`` + ``model.safetensors``); ``atomic_write`` (temporary
file in the same folder, flush to disk, ``os.replace``) and ``tensor_digest`` (the SHA-256 that saved models and
training checkpoints carry) live here, the lowest layer that checkpoints, so the training checkpoints, the training
loop, the tools' reports and the CLI all import them from this one module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

if TYPE_CHECKING:
    from ._paper import PaperModel
    from .backbone import Backbone

__all__ = [
    "atomic_write",
    "stale_temporaries",
    "tensor_digest",
    "model_config",
    "save",
    "load",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_FORMAT = "attnzoo-model-1"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``, so ``path`` is always whole or absent.

    The temporary file is created new (``O_EXCL``) and renamed over ``path``: a symlink at ``path`` is replaced,
    never followed, so its target is never written. It keeps ``path``'s suffix (``.NAME.XXXX.tmp.png``) so that
    writers which infer the format from the name work; ``stale_temporaries`` finds those a killed process left.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def stale_temporaries(directory: Path) -> list[Path]:
    """The temporary files of interrupted ``atomic_write`` calls in ``directory`` (regular files only)."""
    found = {*directory.glob(".*.tmp"), *directory.glob(".*.tmp.*")}
    return sorted(p for p in found if p.is_file() and not p.is_symlink())


def tensor_digest(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, then ``text`` (the metadata read back with them)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(text.encode())
    return h.hexdigest()


def model_config(model: Backbone | PaperModel) -> dict[str, Any]:
    """The ``create`` arguments that rebuild ``model`` (JSON-serialisable)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model was not built by attnzoo.models.create, so it has no config to save")
    return json.loads(json.dumps(config))


def save(model: Backbone | PaperModel, directory: str | Path) -> None:
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
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of create() arguments, got {type(config).__name__}")
    if ("size" in config) == ("name" in config):
        raise ValueError(f"{path} must name either an arena size ('size') or a published model ('name')")
    # a published model's other keys are overrides of its configuration, which create() checks by name
    allowed = set(config) if "name" in config else {
        "size", "mixers", "num_classes", "in_chans", "img_size", "mixer_kwargs", "channel_mixer", "channel_mixer_kwargs"
    }  # fmt: skip
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return config


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> Backbone | PaperModel:
    """The trained model of a run folder (``model.json`` + ``model.safetensors``), in eval mode.

    Both files are checked against the SHA-256 written by ``save``; every error names the file and what is wrong.
    """
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a finished attnzoo run folder")
    config = _read_config(config_path)
    from . import create  # the package's builder; imported here because the package imports this module

    try:
        model = create(config.pop("size", None) or config.pop("name"), **config)
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
        raise ValueError(
            f"{weights} does not fit {config_path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tensors[k].shape != v.shape
    ]
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
