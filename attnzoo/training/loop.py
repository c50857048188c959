"""The training loop: AdamW + warm-up/cosine schedule, per-epoch evaluation, exact resume, DDP under torchrun.

Reproducibility design. The order of epoch ``e`` is ``randperm(N)`` from a generator seeded with ``(seed, e)``, and
global batch ``b`` is its slice ``[b·B, (b+1)·B)`` (the last partial batch is dropped), so the data position is fully
described by the step counter. A checkpoint stores weights, optimizer, scheduler, step and every rank's torch /
NumPy / Python generator states; resuming restores all of them and skips to the stored step, so a run killed at any
moment and resumed from its last checkpoint takes exactly the same steps as an uninterrupted one (bitwise equal
weights on the same machine and thread count). Under ``torchrun`` each of the W ranks takes the contiguous
``B / W`` slice of the same global batch and DDP averages the gradients, so W processes follow 1 process up to float
rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..models.saving import atomic_write, stale_temporaries
from .checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    capture_rng,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from .data import DATASETS, ImageData, load_dataset

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "RUN_FILE", "METRICS_FILE", "CURVES_FILE"]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class TrainError(ValueError):
    """A training request that cannot run as given (bad option, unusable mixer, run folder in the way)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored as ``run.json`` in the run folder."""

    mixers: list[str]
    out: str
    size: str = "tiny"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    checkpoint_every: int = 0
    log_every: int = 50
    eval_batch_size: int = 512
    mixer_kwargs: list[dict[str, Any]] | None = None

    def validate(self) -> None:
        """Raise ``TrainError`` naming the first field that breaks its rule (types are checked, not coerced)."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if not _is_int(value) or value < 1:
                raise TrainError(f"{name}={value!r} must be a positive integer")
        for name in ("limit_train", "limit_eval"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise TrainError(f"{name}={value!r} must be a positive integer")
        if not _is_int(self.checkpoint_every) or not 0 <= self.checkpoint_every < 2**63:
            raise TrainError(
                f"checkpoint_every={self.checkpoint_every!r} must be an integer in [0, 2**63) (0: only at epoch ends)"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise TrainError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
        for name in ("lr", "weight_decay", "warmup_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainError(f"{name}={value!r} must be a finite number")
        if not self.lr > 0:
            raise TrainError(f"lr={self.lr} must be positive")
        if not self.weight_decay >= 0:
            raise TrainError(f"weight_decay={self.weight_decay} must be ≥ 0")
        if not 0 <= self.warmup_fraction < 1:
            raise TrainError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not isinstance(self.mixers, list) or not all(isinstance(m, str) for m in self.mixers):
            raise TrainError(f"mixers={self.mixers!r} must be a list of mechanism names")
        if not isinstance(self.out, str) or not self.out.strip():
            raise TrainError(f"out={self.out!r} must name a folder")
        if self.dataset not in DATASETS:
            raise TrainError(f"dataset={self.dataset!r} must be one of {', '.join(DATASETS)}")

    @classmethod
    def from_json(cls, text: str, source: str = RUN_FILE) -> TrainConfig:
        """The config stored in ``run.json``; a ``TrainError`` naming ``source`` when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainError(f"{source} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TrainError(f"{source} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"{source} has unknown fields {unknown}")
        try:
            config = cls(**data)
        except TypeError as exc:
            raise TrainError(f"{source} does not describe a run ({exc})") from None
        try:
            config.validate()
        except TrainError as exc:
            raise TrainError(f"{source}: {exc}") from None
        return config

    def identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (not where it is written or where the data lies)."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in ("out", "data_dir")}))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainResult:
    """What a finished run reached."""

    out: Path
    steps: int
    test_accuracy: float
    test_loss: float
    train_images_per_s: float
    parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def _setup_distributed(device: str = "auto") -> _Dist:
    """One process (or one torchrun rank): CUDA when ``device`` is "cuda" (or "auto" and a GPU is there), else
    CPU; several ranks talk over NCCL on GPUs and gloo on CPUs."""
    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"device={device!r} must be 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("device='cuda' but CUDA is not available on this machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1 and not dist.is_initialized():
        return _Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    started = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, started_here=started)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def evaluate(model: nn.Module, data: ImageData, ctx: _Dist | None = None, batch_size: int = 512) -> tuple[float, float]:
    """Test ``(accuracy, mean loss)``; under DDP each rank scores a shard and the sums are reduced."""
    ctx = ctx or _Dist(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    index = torch.arange(ctx.rank, len(data.test_labels), ctx.world)
    loss_sum = correct = 0.0
    with torch.no_grad():
        for chunk in index.split(batch_size):
            x, y = data.batch("test", chunk, ctx.device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    model.train(was_training)
    loss_sum, correct, seen = ctx.sum(loss_sum, correct, len(index))
    return correct / max(seen, 1), loss_sum / max(seen, 1)


def _plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["kind"] == "train"]
    test = [h for h in history if h["kind"] == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    ax_loss.plot([h["step"] for h in test], [h["test_loss"] for h in test], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.plot([h["step"] for h in train], [h["accuracy"] for h in train], label="train")
    ax_acc.plot([h["step"] for h in test], [h["test_accuracy"] for h in test], "o-", label="test")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        disable=not enabled,
        transient=False,
    )


LOCK_FILE = ".lock"


def _lock_run_folder(out: Path):
    """An exclusive ``fcntl`` lock on ``out/.lock`` holding this process's pid, held until the process ends or the
    returned file is closed; a second run into the same folder fails at once naming the holder."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise TrainError(
            f"{out} is in use by another attnzoo train (pid {holder}); wait for it or choose another --out"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _clean_stale_temporaries(out: Path) -> None:
    """Remove ``.NAME.XXXX.tmp`` files left by a process killed in the middle of an atomic write."""
    for path in stale_temporaries(out):
        path.unlink(missing_ok=True)


def _open_out(config: TrainConfig, resume: bool, ctx: _Dist):
    """Create and lock the run folder before any heavy work (rank 0), clean what a killed run left, and refuse a
    folder that already holds another run; returns ``(folder, lock)``."""
    out = Path(config.out)
    lock = None
    if ctx.main:
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise TrainError(f"--out {config.out!r} is not a folder (a file or symlink is in the way)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = _lock_run_folder(out)
            _clean_stale_temporaries(out)
        except OSError as exc:
            raise TrainError(f"--out {config.out!r} is not a usable folder ({exc.strerror or exc})") from None
    try:
        if not resume and (out / RUN_FILE).exists():
            raise TrainError(
                f"{out} already holds a run; resume it with `attnzoo train --resume {out}` or choose another --out"
            )
        if ctx.world > 1:
            dist.barrier()  # every rank has looked before rank 0 writes run.json
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return out, lock


def _read_history(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Metrics lines of an earlier attempt, keeping only those up to the resumed checkpoint's step."""
    if not path.is_file():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if entry.get("step", 0) <= upto_step:
            history.append(entry)
    return history


def train(
    config: TrainConfig, *, resume: bool = False, show_progress: bool = True, device: str = "auto"
) -> TrainResult:
    """Train (or resume) the run described by ``config`` on ``device`` ("auto": CUDA when available, "cpu",
    "cuda"); returns the final test accuracy and throughput."""
    config.validate()
    ctx = _setup_distributed(device)
    try:
        return _train(config, resume, show_progress, ctx)
    finally:
        if ctx.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, resume: bool, show_progress: bool, ctx: _Dist) -> TrainResult:
    out, lock = _open_out(config, resume, ctx)
    try:
        run = _start(config, resume, ctx, out)
        _restore(run, resume)
        _open_metrics(run, resume)
        _loop(run, show_progress)
        return _result(run)
    finally:
        if lock is not None:
            lock.close()


@dataclass
class _Run:
    """One training run: what ``_start`` builds, and the progress that the step functions advance and checkpoint."""

    config: TrainConfig
    ctx: _Dist
    out: Path
    data: ImageData
    raw: nn.Module  # the model itself (checkpointed, saved)
    model: nn.Module  # what is called: ``raw`` or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total: int  # steps of the whole run
    steps_per_epoch: int
    local: int  # this rank's share of the global batch
    parameters: int
    step: int = 0
    running: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, seen this epoch
    train_time: float = 0.0
    train_images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    window_start: float = 0.0  # throughput window of the training log
    window_images: int = 0
    order: torch.Tensor | None = None  # this epoch's data order
    test_accuracy: float = math.nan
    test_loss: float = math.nan

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    @property
    def title(self) -> str:
        return f"{self.config.size} · {'/'.join(self.config.mixers)} · {self.config.dataset}"


def _start(config: TrainConfig, resume: bool, ctx: _Dist, out: Path) -> _Run:
    """Load the data, build the model, optimizer and schedule (seeded), and write ``run.json`` for a new run."""
    data = load_dataset(config.dataset, config.data_dir).limit(config.limit_train, config.limit_eval)
    n_train = len(data.train_labels)
    if config.batch_size % ctx.world:
        raise TrainError(
            f"batch_size={config.batch_size} (the global batch) must be divisible by {ctx.world} processes"
        )
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"batch_size={config.batch_size} is larger than the {n_train} training images")
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_fraction * total))

    _seed_everything(config.seed)
    try:
        raw = models.create(
            config.size,
            config.mixers,
            num_classes=len(data.classes),
            in_chans=data.in_chans,
            img_size=data.img_size,
            mixer_kwargs=config.mixer_kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise TrainError(str(exc)) from None
    raw.to(ctx.device)
    model: nn.Module = raw
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    decay = [p for p in raw.parameters() if p.ndim >= 2]
    no_decay = [p for p in raw.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))

    if ctx.main and not resume:
        atomic_write(out / RUN_FILE, lambda p: p.write_text(json.dumps(asdict(config), indent=1)))
    return _Run(
        config, ctx, out, data, raw, model, optimizer, scheduler, total, steps_per_epoch,
        local=config.batch_size // ctx.world, parameters=sum(p.numel() for p in raw.parameters()),
    )  # fmt: skip


def _restore(run: _Run, resume: bool) -> None:
    """Continue from the run folder's checkpoint (when resuming and there is one): weights, optimizer, schedule,
    random generators and progress, after checking that it belongs to this run."""
    path = run.ckpt_path
    if not resume or not (path.exists() or path.is_symlink()):
        return
    ckpt = read_checkpoint(path)
    identity = run.config.identity()
    stored = ckpt.progress.get("config")
    if stored != identity:
        stored = stored if isinstance(stored, dict) else {}
        differing = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        details = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs run {identity.get(k)!r}" for k in differing[:6])
        raise CheckpointError(f"{path} belongs to another run configuration ({details})")
    if ckpt.progress.get("total_steps") != run.total:
        raise CheckpointError(
            f"{path} was written for {ckpt.progress.get('total_steps')} steps, this run has {run.total}"
        )
    try:
        run.raw.load_state_dict(ckpt.model_state)
        run.optimizer.load_state_dict(ckpt.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this model: {str(exc).splitlines()[0]}") from None
    run.scheduler.load_state_dict(ckpt.scheduler_state)
    rank = run.ctx.rank
    restore_rng(ckpt.rng[rank] if rank < len(ckpt.rng) else ckpt.rng[0])
    run.step = ckpt.progress["step"]
    run.running = list(ckpt.progress["running"]) if run.ctx.main else [0.0, 0.0, 0.0]  # global totals on rank 0
    run.train_time, run.train_images = ckpt.progress["train_time"], ckpt.progress["train_images"]


def _open_metrics(run: _Run, resume: bool) -> None:
    """Start ``metrics.jsonl`` afresh, keeping (on resume) the lines up to the restored step."""
    if not run.ctx.main:
        return
    run.history = _read_history(run.out / METRICS_FILE, run.step) if resume else []
    lines = "".join(json.dumps(h) + "\n" for h in run.history)
    atomic_write(run.out / METRICS_FILE, lambda p: p.write_text(lines))


def _log(run: _Run, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the history and ``metrics.jsonl`` (rank 0)."""
    if run.ctx.main:
        run.history.append(entry)
        fd = os.open(run.out / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _check_finite(what: str, value: float, step: int, ckpt_path: Path) -> None:
    if not math.isfinite(value):
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else "no checkpoint was written"
        raise TrainError(
            f"{what} became {value} at step {step}: training stopped ({kept}); lower --lr or check the data"
        )


def _check_weights_finite(run: _Run) -> None:
    """Never save or checkpoint non-finite weights: stop, keeping the last good checkpoint."""
    if not all(bool(p.isfinite().all()) for p in run.raw.parameters()):
        _check_finite("a model weight", float("nan"), run.step, run.ckpt_path)


def _checkpoint(run: _Run) -> None:
    """Write the checkpoint (rank 0) with every rank's random generator states."""
    ctx = run.ctx
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, capture_rng())
    else:
        states = [capture_rng()]
    reduced = ctx.sum(*run.running)
    _check_weights_finite(run)
    if ctx.main:
        progress = {"config": run.config.identity(), "step": run.step, "epoch": run.step // run.steps_per_epoch,
                    "batch_in_epoch": run.step % run.steps_per_epoch,
                    "total_steps": run.total, "running": reduced, "train_time": run.train_time,
                    "train_images": run.train_images, "world_size": ctx.world, "seed": run.config.seed}  # fmt: skip
        state = Checkpoint(
            run.raw.state_dict(), run.optimizer.state_dict(), run.scheduler.state_dict(), progress, states
        )
        write_checkpoint(run.ckpt_path, state)


def _batch_index(run: _Run) -> torch.Tensor:
    """This rank's slice of the global batch at ``run.step`` (drawing the epoch's order at its start or on resume)."""
    epoch, b = divmod(run.step, run.steps_per_epoch)
    if b == 0 or run.order is None:
        run.order = _epoch_order(run.config.seed, epoch, len(run.data.train_labels))
    first = b * run.config.batch_size + run.ctx.rank * run.local
    return run.order[first : first + run.local]


def _objective(run: _Run, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classification loss, training objective)``: the objective adds the mechanisms' auxiliary losses
    (``Backbone.auxiliary_loss``, the sum of every mechanism's ``aux_loss()``)."""
    loss = F.cross_entropy(logits, y)
    aux = run.raw.auxiliary_loss()
    return loss, loss if aux is None else loss + aux


def _train_step(run: _Run) -> None:
    """One optimizer step on the next batch; stops the run (every rank together) on a non-finite loss."""
    t0 = time.perf_counter()
    x, y = run.data.batch("train", _batch_index(run), run.ctx.device)
    logits = run.model(x)
    loss, objective = _objective(run, logits, y)
    value = float(objective.detach())
    if run.ctx.world > 1:  # every rank stops together (one would otherwise wait forever in the all-reduce)
        value = value if run.ctx.sum(0.0 if math.isfinite(value) else 1.0)[0] == 0 else math.nan
    _check_finite("the training loss", value, run.step, run.ckpt_path)
    run.optimizer.zero_grad(set_to_none=True)
    objective.backward()
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    run.train_time += time.perf_counter() - t0
    run.train_images += run.config.batch_size
    run.window_images += run.config.batch_size
    run.running[0] += loss.item() * len(y)
    run.running[1] += (logits.argmax(-1) == y).sum().item()
    run.running[2] += len(y)


def _log_training(run: _Run, bar, task) -> None:
    """Log the epoch's running loss and accuracy and the throughput since the last log."""
    loss_sum, correct, seen = run.ctx.sum(*run.running)
    rate = run.window_images / max(time.perf_counter() - run.window_start, 1e-9)
    run.window_start, run.window_images = time.perf_counter(), 0
    entry = {"kind": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
             "loss": loss_sum / seen, "accuracy": correct / seen, "lr": run.scheduler.get_last_lr()[0],
             "images_per_s": rate}  # fmt: skip
    _log(run, entry)
    bar.update(task, stats=f"loss {entry['loss']:.3f}  acc {entry['accuracy']:.3f}  {rate:,.0f} img/s")


def _end_epoch(run: _Run, bar) -> None:
    """Evaluate, log, save the model and curves (rank 0), checkpoint."""
    epoch = run.step // run.steps_per_epoch
    run.test_accuracy, run.test_loss = evaluate(run.model, run.data, run.ctx, run.config.eval_batch_size)
    _log(run, {"kind": "eval", "step": run.step, "epoch": epoch, "test_accuracy": run.test_accuracy,
               "test_loss": run.test_loss})  # fmt: skip
    if run.ctx.main:
        bar.console.print(
            f"epoch {epoch}/{run.config.epochs}: test accuracy {run.test_accuracy:.4f}, loss {run.test_loss:.4f}"
        )
    run.running = [0.0, 0.0, 0.0]
    _check_weights_finite(run)
    if run.ctx.main:
        models.save(run.raw, run.out)
        _plot_curves(run.history, run.out / CURVES_FILE, run.title)
    _checkpoint(run)
    run.window_start = time.perf_counter()


def _loop(run: _Run, show_progress: bool) -> None:
    """Train from ``run.step`` to the end: step, log, evaluate and checkpoint at epoch ends (and every
    ``checkpoint_every`` steps)."""
    config = run.config
    run.window_start, run.window_images = time.perf_counter(), 0
    run.model.train()
    with _progress(show_progress and run.ctx.main) as bar:
        task = bar.add_task(run.title, total=run.total, completed=run.step, stats="")
        while run.step < run.total:
            _train_step(run)
            end_of_epoch = run.step % run.steps_per_epoch == 0
            if run.step % config.log_every == 0 or end_of_epoch:
                _log_training(run, bar, task)
            bar.update(task, completed=run.step)
            if end_of_epoch:
                _end_epoch(run, bar)
            elif config.checkpoint_every and run.step % config.checkpoint_every == 0:
                _checkpoint(run)


def _result(run: _Run) -> TrainResult:
    """What the run reached (the last evaluation in the history, also when it was written before a resume)."""
    evals = [h for h in run.history if h["kind"] == "eval"]
    if evals:
        run.test_accuracy, run.test_loss = evals[-1]["test_accuracy"], evals[-1]["test_loss"]
    rate = run.train_images / max(run.train_time, 1e-9)
    return TrainResult(run.out, run.step, run.test_accuracy, run.test_loss, rate, run.parameters, run.history)
