"""Image classification data held in memory as uint8 tensors: real Fashion-MNIST, or a synthetic stand-in for tests.

``fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``: the
original gzip'd IDX files, 60k train / 10k test 28×28 grey images, 10 classes).
``synthetic`` is a small generated data set (10 classes, each a fixed random blob pattern plus noise, 28×28) that
is learnable in a few steps; it exists so tests and smoke runs need no download, and says nothing about real accuracy.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageData", "DatasetMissing", "DatasetCorrupt", "load_dataset", "DATASETS", "DEFAULT_FASHION_MNIST_DIR"]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Every data set ``load_dataset`` knows, with the one line the command line shows for it.
DATASETS = {
    "fashion-mnist": "real Fashion-MNIST (60k/10k 28×28 grey images, 10 classes)",
    "synthetic": "generated blobs (10 classes, 28×28), for tests and smoke runs only",
}
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetMissing(FileNotFoundError):
    """The requested data set is not installed; the message says how to install it."""


@dataclass
class ImageData:
    """Train and test splits: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``; normalised on use."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: float
    std: float

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_images.shape[-1]

    def batch(
        self, split: str, index: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels of ``split`` at ``index``."""
        images, labels = (
            (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        )
        x = images[index].to(device=device, dtype=torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x, labels[index].to(device)

    def limit(self, train: int | None, test: int | None) -> ImageData:
        """The first ``train`` / ``test`` examples (``None`` keeps all)."""
        return ImageData(
            self.train_images[:train],
            self.train_labels[:train],
            self.test_images[:test],
            self.test_labels[:test],
            self.classes,
            self.mean,
            self.std,
        )


class DatasetCorrupt(ValueError):
    """A data set file that exists but cannot be read as what it should be; the message names the file."""


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DatasetCorrupt(
            f"{path} is not a readable gzip file ({exc}); reinstall it with `{INSTALL_HINT}`"
        ) from None
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic != expected_magic:
        raise DatasetCorrupt(
            f"{path} is not an IDX file of the expected kind (magic {magic:#x}, expected {expected_magic:#x})"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if len(raw) < 4 + 4 * ndim or data.size != math.prod(dims):
        raise DatasetCorrupt(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_fashion_mnist(directory: str | Path | None = None) -> ImageData:
    """The real Fashion-MNIST from ``directory`` (default: Debian's install location or ``$ATTNZOO_FASHION_MNIST``)."""
    directory = Path(directory or os.environ.get("ATTNZOO_FASHION_MNIST", DEFAULT_FASHION_MNIST_DIR))
    files = [directory / name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}); install it with `{INSTALL_HINT}`"
        )
    splits = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images = _read_idx(directory / images_file, 0x803)
        labels = _read_idx(directory / labels_file, 0x801)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetCorrupt(
                f"{directory / images_file} ({images.shape}) and {directory / labels_file} ({labels.shape}) do not "
                "hold one label per image"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DatasetCorrupt(f"{directory / labels_file} holds label {int(labels.max())}, beyond the 10 classes")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ImageData(*splits["train"], *splits["test"], FASHION_MNIST_CLASSES, mean=0.2860, std=0.3530)


def make_synthetic(train: int = 512, test: int = 256, size: int = 28, classes: int = 10, seed: int = 0) -> ImageData:
    """A generated, learnable stand-in for Fashion-MNIST (same shapes), for tests and smoke runs only."""
    gen = torch.Generator().manual_seed(seed)
    templates = F.avg_pool2d(torch.rand(classes, 1, size, size, generator=gen), 5, stride=1, padding=2)
    templates = (templates - templates.mean(dim=(1, 2, 3), keepdim=True)) * 6 + 0.5

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(classes, (n,), generator=gen)
        images = templates[labels] + 0.25 * torch.randn(n, 1, size, size, generator=gen)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    names = tuple(f"class {i}" for i in range(classes))
    return ImageData(*split(train), *split(test), names, mean=0.5, std=0.3)


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageData:
    """``"fashion-mnist"`` (real, raises ``DatasetMissing`` with the install command) or ``"synthetic"``."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "synthetic":
        return make_synthetic()
    raise ValueError(f"dataset={name!r} must be one of {tuple(DATASETS)}")
