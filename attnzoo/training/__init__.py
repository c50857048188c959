"""Training on real data: Fashion-MNIST loading, an exactly resumable AdamW loop with DDP, and the mixer arena."""

from .checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from .data import DATASETS, DatasetCorrupt, DatasetMissing, ImageData, load_dataset, load_fashion_mnist, make_synthetic
from .loop import CURVES_FILE, METRICS_FILE, RUN_FILE, TrainConfig, TrainError, TrainResult, evaluate, train

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "CheckpointError",
    "read_checkpoint",
    "write_checkpoint",
    "DATASETS",
    "DatasetCorrupt",
    "DatasetMissing",
    "ImageData",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "CURVES_FILE",
    "METRICS_FILE",
    "RUN_FILE",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "evaluate",
    "train",
]
