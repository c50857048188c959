"""Training: exact resume after SIGKILL, corrupt checkpoints, torchrun DDP, schedule, and real Fashion-MNIST."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import attnzoo
from attnzoo import models
from attnzoo.training import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    CheckpointError,
    TrainConfig,
    load_fashion_mnist,
    read_checkpoint,
    train,
)
from attnzoo.training.data import DEFAULT_FASHION_MNIST_DIR
from attnzoo.training.loop import _epoch_order, _lr_factor

# 2 epochs × 6 steps of 16 synthetic images; a checkpoint every 2 steps.
RUN = [
    "--mixer",
    "neighborhood",
    "--dataset",
    "synthetic",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--limit-train",
    "96",
    "--limit-eval",
    "32",
    "--checkpoint-every",
    "2",
    "--log-every",
    "2",
    "--seed",
    "3",
    "--no-progress",
]
TOTAL_STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, threads: bool = True) -> subprocess.CompletedProcess:
    extra = ["--threads", "1"] if threads else []
    return subprocess.run(
        [sys.executable, "-m", "attnzoo", "train", *args, *extra], env=ENV, capture_output=True, text=True, timeout=300
    )


def one_line_error(stderr: str, needle: str) -> bool:
    """The CLI printed exactly one error line (no traceback) and it contains ``needle``."""
    errors = [line for line in stderr.splitlines() if line.startswith("attnzoo train: error:")]
    return len(errors) == 1 and needle in errors[0] and "Traceback" not in stderr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted run of RUN."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    result = cli(*RUN, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_uninterrupted_run_writes_everything(baseline):
    for name in ("run.json", "model.json", "model.safetensors", CHECKPOINT_FILE, METRICS_FILE, "curves.png"):
        assert (baseline / name).is_file(), name
    assert read_checkpoint(baseline / CHECKPOINT_FILE).progress["step"] == TOTAL_STEPS
    model = models.load(baseline)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    lines = (baseline / METRICS_FILE).read_text().splitlines()
    assert sum('"eval"' in line for line in lines) == 2


def _tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resume_after_sigkill_matches_uninterrupted_bitwise(baseline, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnzoo", "train", *RUN, "--out", str(out), "--threads", "1"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (out / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = read_checkpoint(out / CHECKPOINT_FILE).progress["step"]
    assert 0 < killed_at < TOTAL_STEPS
    resumed = cli("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    # bitwise-equal tensors and equal metadata (safetensors orders metadata keys differently per process, so the
    # files' bytes are not compared)
    weights = _tensors_and_metadata(out / "model.safetensors")
    reference = _tensors_and_metadata(baseline / "model.safetensors")
    assert weights[1] == reference[1] and weights[0].keys() == reference[0].keys()
    assert all(torch.equal(weights[0][k], reference[0][k]) for k in weights[0])
    ours, theirs = load_file(str(out / CHECKPOINT_FILE)), load_file(str(baseline / CHECKPOINT_FILE))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith(("model/", "optim/")))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 2  # train+eval share the epoch-end steps


def test_corrupt_checkpoint_gives_one_line_error(baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    ckpt = out / CHECKPOINT_FILE
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    result = cli("--resume", str(out))
    assert result.returncode == 2
    assert one_line_error(result.stderr, "truncated or corrupt")
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(ckpt)


def test_torchrun_two_processes_match_one(baseline, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "attnzoo", "train", *RUN, "--out", str(out)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, single = load_file(str(out / "model.safetensors")), load_file(str(baseline / "model.safetensors"))
    assert ddp.keys() == single.keys()
    # Key biases only get rounding-noise gradients (softmax ignores a per-query shift), which AdamW normalises into
    # lr-sized random steps; every other weight agrees far closer, and the functions agree to rounding.
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-3, msg=key)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(models.load(out)(x), models.load(baseline)(x), rtol=1e-4, atol=1e-4)
    assert len(read_checkpoint(out / CHECKPOINT_FILE).rng) == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    from attnzoo.cli import main

    assert main(["train", "--mixer", "neighborhood", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert one_line_error(capsys.readouterr().err, "apt-get install -y dataset-fashion-mnist")
    assert main(["train", "--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert one_line_error(capsys.readouterr().err, "--epochs")


def test_schedule_and_data_order():
    factors = [_lr_factor(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.01
    assert torch.equal(_epoch_order(0, 1, 50), _epoch_order(0, 1, 50))
    assert not torch.equal(_epoch_order(0, 1, 50), _epoch_order(0, 2, 50))
    assert sorted(_epoch_order(0, 1, 50).tolist()) == list(range(50))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="batch_size=0"):
        train(TrainConfig(mixers=["neighborhood"] * 4, out=str(tmp_path), batch_size=0, dataset="synthetic"))


@pytest.mark.dataset
@pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist"
)
def test_real_fashion_mnist_beats_chance(tmp_path):
    data = load_fashion_mnist()
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_labels.bincount().tolist() == [6000] * 10
    config = TrainConfig(
        mixers=["neighborhood"] * 4,
        out=str(tmp_path / "run"),
        batch_size=64,
        limit_train=1536,
        limit_eval=1000,
        lr=3e-3,
    )
    result = train(config, show_progress=False)
    assert result.test_accuracy > 0.4, result.test_accuracy  # chance is 0.1


def test_arena_writes_comparison(tmp_path, capsys):
    from attnzoo.cli import main

    args = [
        "arena",
        "--mixers",
        "neighborhood,window",
        "--dataset",
        "synthetic",
        "--limit-train",
        "32",
        "--limit-eval",
        "16",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    if "window" not in attnzoo.list_mechanisms():
        args[2] = "neighborhood"
    assert main(args) == 0
    rows = json.loads((tmp_path / "arena.json").read_text())["rows"]
    assert [r["mixer"] for r in rows] == args[2].split(",")
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and r["parameters"] > 1e5 and r["gflops_per_image"] > 0.01
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0
    assert (tmp_path / "arena.png").stat().st_size > 1000
    assert (tmp_path / "arena.csv").read_text().splitlines()[0].startswith("mixer,test_accuracy")
    assert "test acc" in capsys.readouterr().out
    assert main(["arena", "--mixers", "neighbourhood", "--dataset", "synthetic", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_gpu_is_one_line_error(tmp_path, capsys):
    from attnzoo.cli import main

    args = ["train", "--device", "cuda", *RUN, "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert one_line_error(capsys.readouterr().err, "CUDA is not available")
