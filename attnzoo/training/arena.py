"""The arena: train the same backbone once per mechanism on the same data and seed, then compare them.

Per mechanism: test accuracy, parameters, forward FLOPs per image (``attnzoo.ops.count_flops``:
``torch.utils.flop_counter`` plus the engine's fused ops and FFTs; other operators without a FLOP formula count as
0), training images/s (measured during training) and inference images/s (``torch.utils.benchmark`` on one thread,
batch 256). Writes ``arena.csv``, ``arena.json`` and ``arena.png`` (accuracy vs FLOPs);
each mechanism's run folder ``<out>/<name>/`` is resumed if it exists, so an interrupted arena continues.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..models.saving import atomic_write
from ..ops import count_flops
from ..tools.costs import median_latency
from .data import load_dataset
from .loop import RUN_FILE, TrainConfig, TrainError, train

__all__ = ["run_arena", "COLUMNS"]

COLUMNS = ("mixer", "test_accuracy", "parameters", "gflops_per_image", "train_images_per_s", "infer_images_per_s")


def flops_per_image(model: torch.nn.Module, in_chans: int, img_size: int) -> int:
    """Forward FLOPs of one image (``count_flops``)."""
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size)
    with torch.no_grad():
        return count_flops(lambda: model(x))


def inference_rate(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Images per second of ``model(x)`` in eval mode (median of ``torch.utils.benchmark``, one thread)."""
    model.eval()
    with torch.no_grad():
        return len(x) / median_latency(lambda: model(x), threads=1, min_run_time=1.0)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        ax.scatter(row["gflops_per_image"], row["test_accuracy"], s=40)
        ax.annotate(
            row["mixer"], (row["gflops_per_image"], row["test_accuracy"]), textcoords="offset points", xytext=(5, 4)
        )
    ax.set(xlabel="GFLOPs per image (forward)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def run_arena(mixers: list[str], base: TrainConfig, *, show_progress: bool = True) -> list[dict[str, Any]]:
    """Train ``base`` once per mechanism in ``mixers`` (every stage) under ``base.out/<name>``; write the comparison."""
    if len(set(mixers)) != len(mixers) or not mixers:
        raise TrainError(f"mixers={mixers} must be distinct names, at least one")
    out = Path(base.out)
    try:  # an unusable --out fails now, not after the data is loaded and the first mechanism is trained
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".attnzoo-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"--out {base.out!r} is not a writable folder ({exc.strerror or exc})") from None
    data = load_dataset(base.dataset, base.data_dir)
    for name in mixers:  # fail before any training if one of them cannot be built
        try:
            models.create(
                base.size, name, num_classes=len(data.classes), in_chans=data.in_chans, img_size=data.img_size
            )
        except (ValueError, TypeError) as exc:
            raise TrainError(str(exc).splitlines()[0]) from None
    x = data.batch("test", torch.arange(min(256, len(data.test_labels))))[0]
    rows = []
    for name in mixers:
        config = replace(base, mixers=[name] * models.SIZES[base.size].num_stages, out=str(out / name))
        result = train(config, resume=(out / name / RUN_FILE).is_file(), show_progress=show_progress)
        model = models.load(out / name)
        rows.append(
            {
                "mixer": name,
                "test_accuracy": result.test_accuracy,
                "parameters": result.parameters,
                "gflops_per_image": flops_per_image(model, data.in_chans, data.img_size) / 1e9,
                "train_images_per_s": result.train_images_per_s,
                "infer_images_per_s": inference_rate(model, x),
            }
        )
    out.mkdir(parents=True, exist_ok=True)

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "arena.csv", write_csv)
    meta = {
        "size": base.size,
        "dataset": base.dataset,
        "epochs": base.epochs,
        "seed": base.seed,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    atomic_write(out / "arena.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    _plot(rows, out / "arena.png", f"{base.size} on {base.dataset}, {base.epochs} epoch(s), seed {base.seed}")
    return rows
