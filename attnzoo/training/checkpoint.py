"""Training checkpoints: one safetensors file, written atomically, with everything needed to resume bit-exactly.

Tensors: ``model/<name>`` (weights), ``optim/<param index>/<key>`` (AdamW moments and step), ``rng/<rank>/torch``,
``rng/<rank>/cuda`` and ``rng/<rank>/numpy`` (each rank's generator states). Metadata ``state`` (JSON): progress
(step, epoch, batch within the epoch, running metrics), optimizer param groups, scheduler state, Python and NumPy
scalar RNG fields per rank; metadata ``sha256``: a SHA-256 over every tensor (name, dtype, shape, bytes) and the
``state`` text, so a truncated or corrupted file -- data or metadata -- is refused with a one-line ``CheckpointError``
instead of resuming from garbage. No pickle is involved in reading a checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..models.saving import atomic_write, tensor_digest

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "tensor_digest",
    "Checkpoint",
    "capture_rng",
    "restore_rng",
    "write_checkpoint",
    "read_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "attnzoo-checkpoint-2"  # 2: the SHA-256 covers the metadata and every tensor's dtype and shape


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (truncated, corrupt, or from another run layout)."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    progress: dict[str, Any]
    rng: list[dict[str, Any]] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python generator states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64)),
        "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": json.loads(json.dumps(random.getstate())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo ``capture_rng``: put every generator back where it was."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((name, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in checkpoint.model_state.items():
        tensors[f"model/{name}"] = t.detach().cpu().contiguous().clone()
    optim_rest: dict[str, dict[str, Any]] = {}
    for index, values in checkpoint.optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                optim_rest.setdefault(str(index), {})[key] = value
    rng_rest = []
    for rank, state in enumerate(checkpoint.rng):
        for key in ("torch", "cuda", "numpy"):
            if key in state:
                tensors[f"rng/{rank}/{key}"] = state[key].cpu().contiguous().clone()
        rng_rest.append({"numpy_rest": state["numpy_rest"], "python": state["python"]})
    meta = {
        "format": FORMAT,
        "progress": checkpoint.progress,
        "param_groups": checkpoint.optimizer_state["param_groups"],
        "optim_rest": optim_rest,
        "scheduler": checkpoint.scheduler_state,
        "rng": rng_rest,
    }
    state = json.dumps(meta)
    metadata = {"state": state, "sha256": tensor_digest(tensors, state)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint, raising ``CheckpointError`` (one line) when it is truncated or corrupt."""
    path = Path(path)
    bad = f"checkpoint {path} is truncated or corrupt"
    hint = "delete it to restart this run from the beginning"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a directory or symlink is in the way); {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = metadata["state"]
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, KeyError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{bad} ({reason}); {hint}") from None
    if "sha256" not in metadata and '"attnzoo-checkpoint-1"' in state:
        raise CheckpointError(
            f"{path} was written by an older attnzoo (format 1, metadata not covered by its SHA-256); {hint}"
        )
    if tensor_digest(tensors, state) != metadata.get("sha256"):
        raise CheckpointError(f"{bad} (its tensors and metadata do not match their SHA-256); {hint}")
    try:
        meta = json.loads(state)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{bad} ({exc}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is not an attnzoo checkpoint of this version (format {found!r}); {hint}")
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optim_state.setdefault(int(index), {})[name] = value
    for index, rest in meta["optim_rest"].items():
        optim_state.setdefault(int(index), {}).update(rest)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    rng = []
    for rank, rest in enumerate(meta["rng"]):
        state = dict(rest)
        for key in ("torch", "cuda", "numpy"):
            if f"rng/{rank}/{key}" in tensors:
                state[key] = tensors[f"rng/{rank}/{key}"]
        rng.append(state)
    return Checkpoint(
        model_state=model_state,
        optimizer_state={"state": optim_state, "param_groups": groups},
        scheduler_state=meta["scheduler"],
        progress=meta["progress"],
        rng=rng,
    )
