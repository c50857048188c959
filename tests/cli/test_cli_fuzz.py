"""The command line under bad invocations (issue 18, items 18 and 20): every user error is exit code 2 and exactly
one line on stderr, never a traceback; a table of the reported cases plus hypothesis over option values."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnzoo.cli import main

from conftest import one_error_line

TRAIN = [
    "train",
    "--dataset",
    "synthetic",
    "--limit-train",
    "16",
    "--limit-eval",
    "8",
    "--batch-size",
    "8",
    "--no-progress",
    "--threads",
    "1",
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_usage_error(code: int, err: str, needle: str = "") -> None:
    line = one_error_line(err)
    assert code == 2, (code, err)
    assert "error" in line and needle in line, line


def _fashion_dir(tmp_path, content: dict[str, bytes]):
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    folder = tmp_path / "fashion"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(content.get(name, content.get("*", b"")))
    return folder


def _idx(magic: int, dims: list[int], payload: bytes) -> bytes:
    return gzip.compress(magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload)


def case_out_is_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return [
        "train",
        "--mixer",
        "mhsa",
        "--data-dir",
        str(tmp_path / "nodata"),
        "--out",
        str(tmp_path / "file"),
    ], "--out"


def case_out_under_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return [
        "train",
        "--mixer",
        "mhsa",
        "--data-dir",
        str(tmp_path / "nodata"),
        "--out",
        str(tmp_path / "file" / "run"),
    ], "--out"


def case_arena_out_is_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return [
        "arena",
        "--mixers",
        "mhsa,window",
        "--data-dir",
        str(tmp_path / "nodata"),
        "--out",
        str(tmp_path / "file"),
    ], "--out"


def case_fashion_not_gzip(tmp_path):
    folder = _fashion_dir(tmp_path, {"*": b"this is not gzip"})
    return ["train", "--mixer", "mhsa", "--data-dir", str(folder), "--out", str(tmp_path / "r")], "gzip"


def case_fashion_truncated_gzip(tmp_path):
    folder = _fashion_dir(tmp_path, {"*": _idx(0x803, [10, 28, 28], bytes(7840))[:40]})
    return ["train", "--mixer", "mhsa", "--data-dir", str(folder), "--out", str(tmp_path / "r")], "ubyte.gz"


def case_fashion_wrong_magic(tmp_path):
    folder = _fashion_dir(tmp_path, {"*": _idx(0x1234, [3], bytes(3))})
    return ["train", "--mixer", "mhsa", "--data-dir", str(folder), "--out", str(tmp_path / "r")], "magic"


def case_fashion_short_payload(tmp_path):
    good = _idx(0x803, [10, 28, 28], bytes(100))
    folder = _fashion_dir(tmp_path, {"*": good})
    return ["train", "--mixer", "mhsa", "--data-dir", str(folder), "--out", str(tmp_path / "r")], "truncated"


def case_fashion_label_count(tmp_path):
    images, labels = _idx(0x803, [10, 28, 28], bytes(7840)), _idx(0x801, [9], bytes(9))
    folder = _fashion_dir(
        tmp_path,
        {
            "train-images-idx3-ubyte.gz": images,
            "train-labels-idx1-ubyte.gz": labels,
            "t10k-images-idx3-ubyte.gz": images,
            "t10k-labels-idx1-ubyte.gz": labels,
        },
    )
    return ["train", "--mixer", "mhsa", "--data-dir", str(folder), "--out", str(tmp_path / "r")], "label"


def case_broken_run_json(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"mixers": ')
    return ["train", "--resume", str(tmp_path / "run")], "run.json"


def case_run_json_wrong_type(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"mixers": ["mhsa"] * 4, "out": "x", "epochs": "many"}))
    return ["train", "--resume", str(tmp_path / "run")], "epochs"


def case_seed_huge(tmp_path):
    return [*TRAIN, "--mixer", "mhsa", "--seed", str(2**70), "--out", str(tmp_path / "r")], "--seed"


def case_arena_seed_huge(tmp_path):
    return [
        "arena",
        "--mixers",
        "mhsa,window",
        "--dataset",
        "synthetic",
        "--seed",
        str(2**70),
        "--out",
        str(tmp_path / "r"),
    ], "--seed"


def case_arena_out_unwritable(tmp_path):
    return [
        "arena",
        "--mixers",
        "mhsa,window",
        "--data-dir",
        str(tmp_path / "nodata"),
        "--out",
        "/proc/attnzoo-run",
    ], "--out"


def case_train_out_unwritable(tmp_path):
    return ["train", "--mixer", "mhsa", "--data-dir", str(tmp_path / "nodata"), "--out", "/proc/attnzoo-run"], "--out"


def case_viz_proc(tmp_path):
    return ["viz", "receptive-field", "mhsa", "--out", "/proc/x.png"], "/proc/x.png"


def case_viz_attention_proc(tmp_path):
    return ["viz", "attention-map", "mhsa", "--out", "/proc/x.png"], "/proc/x.png"


def case_bench_huge_size(tmp_path):
    return ["bench", "mhsa", "--size", "100000"], "GiB"


def case_bench_huge_sweep(tmp_path):
    return ["bench", "mhsa", "--size", "8", "--sizes", "8,1000000"], "GiB"


SIMPLE = [
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--lr", "inf"], "lr"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--lr", "nan"], "lr"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--weight-decay", "nan"], "weight_decay"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--epochs", "0"], "epochs"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--epochs", "abc"], "--epochs"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--batch-size", "-1"], "batch_size"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--threads", "0"], "--threads"),
    (["train", *TRAIN[1:], "--mixer", "nosuchmixer"], "nosuchmixer"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--mixer-kwargs", "{"], "--mixer-kwargs"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--mixer-kwargs", "[1, 2]"], "--mixer-kwargs"),
    (["train", *TRAIN[1:], "--mixer", "mhsa", "--mixer-kwargs", '{"num_heads": "x"}'], "num_heads"),
    (["train", "--resume", "/nonexistent/run"], "not a run folder"),
    (["train", *TRAIN[1:]], "--mixer"),
    (["bench", "mhsa", "--out", ""], "--out"),
    (["viz", "receptive-field", "mhsa", "--out", ""], "--out"),
    (["bench", "mhsa", "--dim", "0"], "--dim"),
    (["bench", "mhsa", "--sizes", "a,b"], "--sizes"),
    (["bench", "nosuchmixer"], "nosuchmixer"),
    (["bench", "mhsa", "--device", "nosuchdevice"], "--device"),
    (["viz", "receptive-field", "mhsa", "--out", "x.txt"], ".png"),
    (["viz", "attention-map", "nosuchmixer"], "nosuchmixer"),
    (["viz", "attention-map", "mhsa", "--checkpoint", "/nonexistent"], "/nonexistent"),
    (["nosuchcommand"], "nosuchcommand"),
    (["train", "--no-such-flag"], "--no-such-flag"),
]

CASES = [
    case_out_is_file,
    case_out_under_file,
    case_arena_out_is_file,
    case_fashion_not_gzip,
    case_fashion_truncated_gzip,
    case_fashion_wrong_magic,
    case_fashion_short_payload,
    case_fashion_label_count,
    case_broken_run_json,
    case_run_json_wrong_type,
    case_seed_huge,
    case_arena_seed_huge,
    case_arena_out_unwritable,
    case_train_out_unwritable,
    case_viz_proc,
    case_viz_attention_proc,
    case_bench_huge_size,
    case_bench_huge_sweep,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_reported_cases_are_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needle = case(tmp_path)
    code, err = run_cli(argv, capsys)
    assert_one_line_usage_error(code, err, needle)


@pytest.mark.parametrize("argv,needle", SIMPLE, ids=[f"{i}-{a[0]}" for i, (a, _) in enumerate(SIMPLE)])
def test_bad_invocations_are_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, capsys)
    assert_one_line_usage_error(code, err, needle)


def test_out_is_checked_before_loading_data(tmp_path, capsys, monkeypatch):
    import attnzoo.training.loop as loop

    monkeypatch.setattr(loop, "load_dataset", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["train", "--mixer", "mhsa", "--out", str(tmp_path / "file")], capsys)
    assert_one_line_usage_error(code, err, "--out")


NUMERIC_FLAGS = [
    "--epochs",
    "--batch-size",
    "--lr",
    "--weight-decay",
    "--seed",
    "--limit-train",
    "--limit-eval",
    "--checkpoint-every",
    "--log-every",
    "--threads",
]


def _valid_for(flag: str, text: str) -> bool:
    """Whether ``text`` would be an acceptable value of ``flag`` (those runs would train: not fuzzed here)."""
    try:
        value = float(text) if flag in ("--lr", "--weight-decay") else int(text)
    except ValueError:
        return False
    if flag == "--lr":
        return 0 < value < float("inf")
    if flag == "--weight-decay":
        return 0 <= value < float("inf")
    if flag in ("--seed", "--checkpoint-every"):
        return 0 <= value < 2**63
    return value >= 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder where invalid runs must never create their --out (module-scoped: hypothesis reruns the test body)."""
    return tmp_path_factory.mktemp("cli-fuzz")


def _assert_refused_before_any_output(option: str, scratch: Path) -> None:
    """``attnzoo train ... OPTION`` (in-process, hypothesis cannot fork) is a one-line usage error and creates no --out."""
    from io import StringIO

    err, real = StringIO(), sys.stderr
    sys.stderr = err
    try:
        try:
            code = main([*TRAIN, "--mixer", "mhsa", option, "--out", str(scratch / "never")])
        except SystemExit as exc:
            code = exc.code
    finally:
        sys.stderr = real
    assert_one_line_usage_error(code, err.getvalue())
    assert not (scratch / "never").exists()


@settings(max_examples=40, deadline=None)
@given(
    flag=st.sampled_from(NUMERIC_FLAGS),
    value=st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            ["nan", "inf", "-inf", "-1", "0", "1e400", "2**70", str(2**70), "-0", "1.5", " ", "0x10", "1_000"]
        ),
    ),
)
def test_fuzz_numeric_options(scratch, flag, value):
    assume(not _valid_for(flag, value))
    _assert_refused_before_any_output(f"{flag}={value}", scratch)


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=30))
def test_fuzz_mixer_kwargs(scratch, text):
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    assume(not isinstance(value, (dict, list)) or value == [])  # real kwargs would train; malformed ones may not
    _assert_refused_before_any_output(f"--mixer-kwargs={text}", scratch)
