"""Runs and files under faults (issue 18, items 5, 7-13): hyper-parameters are validated, a non-finite loss stops the
run keeping the last good checkpoint, everything read back is covered by a SHA-256, one run holds a run folder at a
time, a foreign checkpoint is refused naming the differing fields, stale temporaries are cleaned, symlinks are never
followed when writing, and disk faults are one line with exit code 1 while the run stays resumable."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnzoo import models
from attnzoo.cli import main
from attnzoo.training import CHECKPOINT_FILE, RUN_FILE, CheckpointError, TrainConfig, TrainError, read_checkpoint, train

from conftest import one_error_line

# 1 epoch × 4 steps of 8 synthetic images, a checkpoint every 2 steps.
RUN = [
    "--mixer",
    "window",
    "--dataset",
    "synthetic",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--limit-train",
    "32",
    "--limit-eval",
    "16",
    "--checkpoint-every",
    "2",
    "--log-every",
    "2",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


# ---- item 5 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--weight-decay", "nan"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "-0.1"),
        ("--seed", str(2**70)),
        ("--seed", "-1"),
    ],
)
def test_bad_hyper_parameters_are_refused(option, value, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *RUN, option, value, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert option.lstrip("-").replace("-", "_") in line or option in line
    assert not (out / "model.safetensors").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_cross_entropy = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, y, *args, **kwargs):
        calls["n"] += 1
        loss = real_cross_entropy(logits, y, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss  # the third training step diverges

    monkeypatch.setattr("attnzoo.training.loop.F.cross_entropy", poisoned)
    assert main(["train", *RUN, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "became nan at step 2" in line and "last good checkpoint" in line
    ckpt = read_checkpoint(out / CHECKPOINT_FILE)
    assert ckpt.progress["step"] == 2
    assert all(t.isfinite().all() for t in ckpt.model_state.values())
    assert not (out / "model.safetensors").exists()


def test_huge_learning_rate_never_saves_a_nan_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *RUN, "--lr", "1e30", "--out", str(out)])
    if code == 0:  # survived: then whatever was saved must be finite
        assert all(t.isfinite().all() for t in models.load(out).state_dict().values())
    else:
        assert code == 2
        one_error_line(capsys.readouterr().err, "train")
        if (out / "model.safetensors").exists():
            assert all(t.isfinite().all() for t in models.load(out).state_dict().values())


# ---- items 7 and 8 ---------------------------------------------------------------------------------------------


def _header_span(path: Path) -> int:
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + length


def test_checkpoint_metadata_bit_flips_are_refused_or_harmless(finished, tmp_path):
    source = finished / CHECKPOINT_FILE
    data = source.read_bytes()
    original = read_checkpoint(source)
    rng = random.Random(0)
    target = tmp_path / CHECKPOINT_FILE
    accepted_different = []
    for _ in range(300):
        position = rng.randrange(8, _header_span(source))
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(flipped))
        try:
            got = read_checkpoint(target)
        except CheckpointError:
            continue
        same = got.progress == original.progress and got.scheduler_state == original.scheduler_state
        same = same and got.optimizer_state["param_groups"] == original.optimizer_state["param_groups"]
        same = same and all(torch.equal(got.model_state[k], v) for k, v in original.model_state.items())
        if not same:
            accepted_different.append(position)
    assert accepted_different == [], f"{len(accepted_different)} metadata flips were accepted with other contents"


def test_checkpoint_dtype_relabel_is_refused(finished, tmp_path):
    """A header edit that keeps every byte of the data but changes how it is read (F32 -> I32)."""
    target = tmp_path / CHECKPOINT_FILE
    data = (finished / CHECKPOINT_FILE).read_bytes()
    span = _header_span(finished / CHECKPOINT_FILE)
    header = data[8:span].replace(b'"dtype":"F32"', b'"dtype":"I32"', 1)
    target.write_bytes(data[:8] + header + data[span:])
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(target)


def test_saved_model_is_hashed(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        models.load(out)


def test_edited_model_json_is_refused(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    config = json.loads((out / "model.json").read_text())
    config["mixer_kwargs"][0]["window_size"] = 7 if config["mixer_kwargs"][0].get("window_size") != 7 else 2
    (out / "model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.json"):
        models.load(out)


def test_viz_checkpoint_with_flipped_weights_is_one_line(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    code = main(["viz", "attention-map", "window", "--checkpoint", str(out), "--out", str(tmp_path / "m.png")])
    assert code == 2
    assert "model.safetensors" in one_error_line(capsys.readouterr().err, "viz")


# ---- item 9 ----------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from attnzoo.training.loop import _lock_run_folder
lock = _lock_run_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        assert main(["train", *RUN, "--out", str(out)]) == 2
        assert time.monotonic() - started < 10
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"pid {holder.pid}" in line
        assert not (out / RUN_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *RUN, "--out", str(out)]) == 0  # the lock dies with its holder


# ---- item 10 ---------------------------------------------------------------------------------------------------


def test_resume_refuses_an_edited_run_json(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    config = json.loads((out / RUN_FILE).read_text())
    config["seed"] = 7
    (out / RUN_FILE).write_text(json.dumps(config))
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "seed" in line and "7" in line


def test_resume_refuses_a_foreign_checkpoint(finished, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", *RUN, "--seed", "7", "--epochs", "2", "--out", str(other)]) == 0
    out = copy_run(finished, tmp_path)
    shutil.copy(other / CHECKPOINT_FILE, out / CHECKPOINT_FILE)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "seed" in line and "epochs" in line


def test_resume_accepts_matching_options_and_names_differing_ones(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(out), "--mixer", "window", "--epochs", "1", "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--mixer", "mhsa", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "--mixers" in line and "mhsa" in line


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        '{"mixers": ["window"], "out": "x", "lr": "fast"}',
        '{"mixers": ["window"], "out": "x", "colour": 1}',
        "\x00\xff",
    ],
)
def test_broken_run_json_is_one_line(finished, tmp_path, capsys, content):
    out = copy_run(finished, tmp_path)
    (out / RUN_FILE).write_bytes(content.encode("latin-1"))
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "run.json" in one_error_line(capsys.readouterr().err, "train")


# ---- item 11 ---------------------------------------------------------------------------------------------------


def test_stale_temporaries_are_cleaned_on_start(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    stale = [out / ".checkpoint.safetensors.abc123.tmp", out / ".curves.png.x1.tmp.png"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "symlink"])
def test_checkpoint_path_that_is_not_a_file_is_refused(finished, tmp_path, capsys, kind):
    out = copy_run(finished, tmp_path)
    ckpt = out / CHECKPOINT_FILE
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt, elsewhere)
    if kind == "directory":
        ckpt.mkdir()
    elif kind == "dangling symlink":
        ckpt.symlink_to(tmp_path / "missing")
    else:
        ckpt.symlink_to(elsewhere)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "not a regular file" in one_error_line(capsys.readouterr().err, "train")


# ---- item 12 ---------------------------------------------------------------------------------------------------


def test_run_outputs_never_follow_symlinks(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victims = {}
    for name in ("metrics.jsonl", "curves.png", "model.json", "model.safetensors", CHECKPOINT_FILE):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims[name] = victim
    assert main(["train", *RUN, "--out", str(out)]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == "precious", f"{name} was written through its symlink"
        assert not (out / name).is_symlink()


def test_bench_out_never_follows_symlinks(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("bench.csv", "bench.json", "index.html", ".attnzoo-write-test"):
        (out / name).symlink_to(victim)
    code = main(["bench", "mhsa", "--sizes", "8", "--dim", "16", "--min-run-time", "0.001", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert not (out / "bench.csv").is_symlink()


def test_viz_out_never_follows_symlinks(tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_text("precious")
    out = tmp_path / "rf.png"
    out.symlink_to(victim)
    assert main(["viz", "receptive-field", "mhsa", "--size", "8", "--out", str(out)]) == 0
    assert victim.read_text() == "precious" and not out.is_symlink()


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "mhsa", "--out", ""],
        ["viz", "receptive-field", "mhsa", "--out", ""],
        ["train", *RUN, "--out", ""],
        ["arena", "--mixers", "mhsa,window", "--out", ""],
    ],
)
def test_empty_out_is_refused(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out" in err
    assert list(tmp_path.iterdir()) == []


# ---- item 13 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_fault_is_one_line_exit_1_and_the_run_resumes(tmp_path, capsys, monkeypatch, code):
    out = tmp_path / "run"
    import attnzoo.training.loop as loop

    real = loop.write_checkpoint
    calls = {"n": 0}

    def failing(path, checkpoint):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(code, os.strerror(code), str(path))
        real(path, checkpoint)

    monkeypatch.setattr(loop, "write_checkpoint", failing)
    assert main(["train", *RUN, "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert os.strerror(code) in line
    assert read_checkpoint(out / CHECKPOINT_FILE).progress["step"] == 2
    monkeypatch.setattr(loop, "write_checkpoint", real)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert read_checkpoint(out / CHECKPOINT_FILE).progress["step"] == 4


def test_python_api_validates_types(tmp_path):
    for bad in (
        dict(lr=float("inf")),
        dict(weight_decay=float("nan")),
        dict(epochs=1.5),
        dict(seed=True),
        dict(batch_size="8"),
        dict(out=""),
    ):
        config = TrainConfig(**{"mixers": ["window"] * 4, "out": str(tmp_path / "r"), "dataset": "synthetic", **bad})
        with pytest.raises(TrainError, match=next(iter(bad))):
            train(config)


def test_old_format_checkpoint_is_named_as_such(finished, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(finished / CHECKPOINT_FILE), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        state = json.loads(f.metadata()["state"])
    state["format"] = "attnzoo-checkpoint-1"
    save_file(tensors, str(tmp_path / CHECKPOINT_FILE), metadata={"state": json.dumps(state)})
    with pytest.raises(CheckpointError, match="older attnzoo"):
        read_checkpoint(tmp_path / CHECKPOINT_FILE)
