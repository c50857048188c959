"""``attnzoo train``: train an arena backbone with a chosen mixer on an image data set; ``--resume DIR`` continues a run.

Works under ``torchrun --nproc-per-node N -m attnzoo train ...`` (DistributedDataParallel; ``--batch-size`` is the
global batch). The sizes, their stage counts and the data sets come from ``attnzoo.models`` and
``attnzoo.training.data``; this module only parses and formats.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

from ..models import SIZES, list_models
from ..training import RUN_FILE, CheckpointError, DatasetCorrupt, DatasetMissing, TrainConfig, TrainError, train
from ..training.data import DATASETS, DEFAULT_FASHION_MNIST_DIR
from . import UsageError

# Options that define a run; with --resume they come from the run folder's run.json instead.
RUN_OPTIONS = (
    "mixer",
    "mixers",
    "mixer_kwargs",
    "size",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "limit_train",
    "limit_eval",
    "checkpoint_every",
    "log_every",
    "out",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a backbone with a chosen mixer on an image data set (resumable, DDP under torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_data_options(p)
    p.add_argument("--mixer", help="mechanism used in every stage (see `attnzoo list`)")
    p.add_argument("--mixers", help="comma-separated mechanisms, one per stage (e.g. neighborhood,mhsa)")
    p.add_argument("--mixer-kwargs", help="JSON: one object for every stage, or a list with one object per stage")
    p.add_argument("--epochs", type=int, help=f"epochs (default {TrainConfig.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {TrainConfig.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {TrainConfig.lr:g})")
    p.add_argument(
        "--weight-decay", type=float, help=f"AdamW weight decay on matrices (default {TrainConfig.weight_decay:g})"
    )
    p.add_argument("--seed", type=int, help=f"seed of initialisation and data order (default {TrainConfig.seed})")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-eval", type=int, help="use only the first N test images")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every STEPS steps (default: epoch ends only)")
    p.add_argument(
        "--log-every", type=int, help=f"log training metrics every STEPS steps (default {TrainConfig.log_every})"
    )
    p.add_argument("--out", help="run folder (default runs/<time>-<mixers>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default): CUDA when available; under torchrun each rank takes GPU LOCAL_RANK (NCCL), "
        "or the CPU (gloo)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def arena_sizes() -> list[str]:
    """The backbone sizes that take a mixer per stage (``attnzoo.models.list_models("arena")``)."""
    return list_models("arena")


def add_data_options(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """``--size``, ``--dataset`` and ``--data-dir``, their choices asked of the models and data modules.

    ``defaults``: fill in ``TrainConfig``'s defaults (arena); otherwise leave them ``None`` so that ``--resume`` can
    tell which options were given."""
    sizes = ", ".join(f"{n} ({SIZES[n].num_stages} stages)" for n in arena_sizes())
    datasets = "; ".join(f"{name}: {summary}" for name, summary in DATASETS.items())
    p.add_argument("--size", choices=arena_sizes(), default=TrainConfig.size if defaults else None,
                   help=f"backbone size: {sizes}; default {TrainConfig.size}")  # fmt: skip
    p.add_argument("--dataset", choices=list(DATASETS), default=TrainConfig.dataset if defaults else None,
                   help=f"{datasets}; default {TrainConfig.dataset}")  # fmt: skip
    p.add_argument(
        "--data-dir", help=f"folder with the Fashion-MNIST IDX .gz files (default {DEFAULT_FASHION_MNIST_DIR})"
    )


def num_stages(size: str | None) -> int:
    """Stages of the arena backbone ``size`` (``TrainConfig``'s default size when ``None``)."""
    return SIZES[size or TrainConfig.size].num_stages


def split_names(text: str) -> list[str]:
    """The non-empty names of a comma-separated list."""
    return [m.strip() for m in text.split(",") if m.strip()]


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (when given) to torch."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads={threads} must be ≥ 1")
    import torch

    torch.set_num_threads(threads)


@contextmanager
def training_errors() -> Iterator[None]:
    """Report the training errors a user can fix (bad option, corrupt checkpoint, missing data) as one line."""
    try:
        yield
    except (TrainError, CheckpointError, DatasetMissing, DatasetCorrupt) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def parse_mixers(mixer: str | None, mixers: str | None, stages: int) -> list[str]:
    """One name per stage (of ``stages``) from ``--mixer`` / ``--mixers``."""
    if mixer and mixers:
        raise UsageError("give --mixer NAME or --mixers A,B,..., not both")
    if mixers:
        names = split_names(mixers)
        if len(names) == 1:
            return names * stages
        if len(names) != stages:
            raise UsageError(
                f"--mixers={mixers!r} must name 1 or {stages} mechanisms (one per stage), got {len(names)}"
            )
        return names
    if mixer:
        return [mixer] * stages
    raise UsageError("--mixer NAME (or --mixers A,B,...) is required unless --resume DIR is given")


def parse_mixer_kwargs(text: str | None, stages: int) -> list[dict[str, Any]] | None:
    """``--mixer-kwargs``: one JSON object for every stage, or a list of one object (or null) per stage."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--mixer-kwargs is not valid JSON ({exc})") from None
    if isinstance(value, dict):
        return [value] * stages
    if isinstance(value, list) and len(value) == stages and all(isinstance(v, dict) or v is None for v in value):
        return [v or {} for v in value]
    raise UsageError(f"--mixer-kwargs must be a JSON object or a list of {stages} objects (one per stage)")


def _config(args: argparse.Namespace):
    if args.resume:
        run_file = Path(args.resume) / RUN_FILE
        given = [o for o in RUN_OPTIONS if getattr(args, o, None) is not None]
        if not run_file.is_file():
            if given:
                flags = ", ".join(f"--{o.replace('_', '-')}" for o in given)
                raise UsageError(f"--resume takes the run's options from {RUN_FILE}; drop {flags}")
            raise UsageError(f"{args.resume} is not a run folder ({RUN_FILE} not found)")
        try:
            config = TrainConfig.from_json(run_file.read_text(), source=str(run_file))
        except TrainError as exc:
            raise UsageError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{run_file} cannot be read ({exc})") from None
        asked = _asked_values(args, given, num_stages(config.size))
        differing = [o for o in given if o != "out" and asked[o] != getattr(config, o)]
        if differing:
            details = ", ".join(
                f"--{o.replace('_', '-')} {asked[o]!r} (stored {getattr(config, o)!r})" for o in differing
            )
            raise UsageError(f"--resume takes the run's options from {run_file}; these differ: {details}")
        config.out = args.resume
        if args.data_dir:
            config.data_dir = args.data_dir
        return config
    stages = num_stages(args.size)
    mixers = parse_mixers(args.mixer, args.mixers, stages)
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} must be in [0, 2**63)")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    values["mixers"] = mixers
    values["mixer_kwargs"] = parse_mixer_kwargs(args.mixer_kwargs, stages)
    tag = mixers[0] if len(set(mixers)) == 1 else "-".join(mixers)
    values.setdefault("out", str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"))
    return TrainConfig(**values)


def _asked_values(args: argparse.Namespace, given: list[str], stages: int) -> dict[str, Any]:
    """The run options on the command line, in ``TrainConfig``'s form (``--mixer x`` becomes ``mixers``)."""
    asked = {o: getattr(args, o) for o in given}
    if "mixer" in asked or "mixers" in asked:
        asked["mixers"] = parse_mixers(args.mixer, args.mixers, stages)
        asked.pop("mixer", None)
        given[:] = [o for o in given if o != "mixer"] + (["mixers"] if "mixers" not in given else [])
    if "mixer_kwargs" in asked:
        asked["mixer_kwargs"] = parse_mixer_kwargs(args.mixer_kwargs, stages)
    return asked


def check_out(out: str | None) -> None:
    """Refuse an unusable ``--out`` before any data is loaded: empty, or a file (or a path through one)."""
    if out is None:
        return
    if not out.strip():
        raise UsageError("--out '' must name a folder")
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {out!r} is not a folder ({parent} is a file)")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    check_out(args.out)
    config = _config(args)
    with training_errors():
        result = train(config, resume=bool(args.resume), show_progress=not args.no_progress, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{result.out}: test accuracy {result.test_accuracy:.4f} after {result.steps} steps, "
            f"{result.train_images_per_s:,.0f} training images/s, {result.parameters:,} parameters"
        )
    return 0
