"""Atomic file writes (temporary file in the same folder, flush to disk, ``os.replace``) and the SHA-256 that
checkpoints and saved models carry."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


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
