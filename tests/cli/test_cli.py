"""attnzoo list | bench | viz, run in-process through ``attnzoo.cli.main`` (plus one subprocess smoke test)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import uuid

import matplotlib.image
import pytest
import torch

import attnzoo
from attnzoo.cli import main
from attnzoo.mechanisms import registry

from conftest import one_error_line

FAST = ["--min-run-time", "0.01", "--threads", "1"]


def png_shape(path) -> tuple[int, int]:
    """(height, width) of a PNG read back by matplotlib (fails on anything that is not a valid PNG)."""
    image = matplotlib.image.imread(path, format="png")
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image.shape[:2]


@pytest.fixture
def broken_mechanism():
    """A registered mechanism whose forward always fails, removed from the registry afterwards."""
    name = f"zz_broken_{uuid.uuid4().hex[:8]}"

    @registry.register_mechanism(name, family="test", paper="none", year=2024)
    class Broken(torch.nn.Module):
        """Deliberately broken."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("deliberately broken forward")

    yield name
    registry._REGISTRY.pop(name, None)


def test_list_prints_every_mechanism_and_filters_by_family(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attnzoo.list_mechanisms():
        assert name in out
    assert main(["list", "--family", "local"]) == 0
    out = capsys.readouterr().out
    assert "neighborhood" in out and f"({len(attnzoo.list_mechanisms('local'))})" in out


def test_list_unknown_family_is_a_usage_error(capsys):
    assert main(["list", "--family", "no-such-family"]) == 2
    assert "families" in one_error_line(capsys.readouterr().err)


def test_bench_writes_csv_json_png_html_for_every_requested_mechanism(tmp_path, capsys):
    names = ["neighborhood"] + [n for n in ("mhsa", "window") if n in attnzoo.list_mechanisms()]
    out = tmp_path / "report"
    argv = ["bench", *names, "--size", "8", "--dim", "32", "--batch", "1", "--sizes", "8,16", "--out", str(out)]
    code = main([*argv, *FAST])
    assert code == 0, capsys.readouterr().out
    stdout = capsys.readouterr().out
    assert all(n in stdout for n in names) and "latency exp" in stdout
    with open(out / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == names
    assert all(r["ok"] == "True" and float(r["latency_ms"]) > 0 and float(r["latency_ms@16"]) > 0 for r in rows)
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["results"]] == names and data["workload"]["sizes"] == [8, 16]
    na = data["results"][0]
    assert na["check"] == "ref ok" and na["flops"] > 0 and na["peak_bytes"] > 0 and na["params"] > 0
    yardstick = data["yardstick_dense_sdpa_latency_s"]
    assert yardstick > 0 and na["relative_latency"] == pytest.approx(na["latency_s"] / yardstick)
    assert png_shape(out / "cost_vs_receptive_field.png") == (720, 1440)
    for png in ("latency_vs_tokens.png", "memory_vs_tokens.png"):  # one panel per family: size follows the families
        height, width = png_shape(out / png)
        assert height >= 300 and width >= 400
    html = (out / "index.html").read_text()
    assert all(n in html for n in names) and "cost_vs_receptive_field.png" in html


def test_bench_failing_mechanism_gets_a_row_and_nonzero_exit(tmp_path, capsys, broken_mechanism):
    argv = ["bench", broken_mechanism, "neighborhood", "--size", "8", "--dim", "16", "--out", str(tmp_path)]
    code = main([*argv, *FAST])
    assert code == 1
    out = capsys.readouterr().out
    assert broken_mechanism in out and "deliberately broken" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    by_name = {r["name"]: r for r in data["results"]}
    assert by_name[broken_mechanism]["ok"] is False and "deliberately broken" in by_name[broken_mechanism]["error"]
    assert by_name["neighborhood"]["ok"] is True


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "neighbourhood"], "did you mean 'neighborhood'"),
        (["bench", "neighborhood", "--sizes", "8,x"], "--sizes"),
        (["bench", "neighborhood", "--size", "0"], "--size 0"),
        (["bench", "neighborhood", "--device", "nope"], "--device"),
        (["bench", "neighborhood", "--device", "cuda:0" if not torch.cuda.is_available() else "nope"], "--device"),
        (["viz", "receptive-field", "neighbourhod"], "did you mean"),
        (["viz", "receptive-field", "neighborhood", "--size", "2"], "cannot run at 2×2"),
        (["viz", "receptive-field", "neighborhood", "--query", "40,3"], "outside the 28×28"),
        (["viz", "receptive-field", "neighborhood", "--query", "a,b"], "two integers"),
        (["viz", "attention-map", "neighborhood", "--image", "/no/such/photo.png"], "neither a photo name"),
        (["viz", "attention-map", "neighborhood", "--checkpoint", "/no/such/run"], "--checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    if argv[:2] == ["viz", "attention-map"]:
        argv = [*argv, "--out", str(tmp_path / "a.png")]
    elif argv[0] == "viz":
        argv = [*argv, "--out", str(tmp_path / "rf.png")]
    assert main(argv) == 2
    assert fragment in one_error_line(capsys.readouterr().err)


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["bench", "neighborhood", "--out", str(blocker / "sub"), *FAST]) == 2
    assert "--out" in one_error_line(capsys.readouterr().err)
    assert main(["viz", "receptive-field", "neighborhood", "--out", str(blocker / "rf.png")]) == 2
    assert "--out" in one_error_line(capsys.readouterr().err)


def test_viz_receptive_field_png(tmp_path):
    out = tmp_path / "rf.png"
    argv = ["viz", "receptive-field", "neighborhood", "--size", "12", "--query", "6,6", "0,0", "--out", str(out)]
    assert main(argv) == 0
    height, width = png_shape(out)
    assert (height, width) == (320, 340 * 4)  # two queries: fields, then attention


def test_viz_receptive_field_all_is_one_grid(tmp_path, monkeypatch):
    names = ["neighborhood", "mhsa", "squeeze_excite"]
    monkeypatch.setattr("attnzoo.cli.viz_cmd.list_mechanisms", lambda: names)
    out = tmp_path / "all.png"
    assert main(["viz", "receptive-field", "--all", "--size", "8", "--out", str(out)]) == 0
    assert png_shape(out) == (280, 290 * 3)  # one row of three 2.9 × 2.8 in panels at 100 dpi


def test_viz_attention_map_on_a_photo(tmp_path):
    out = tmp_path / "am.png"
    assert main(["viz", "attention-map", "neighborhood", "--image", "coffee", "--size", "8", "--out", str(out)]) == 0
    assert png_shape(out) == (484, 924)


def test_python_dash_m_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "attnzoo", "bench", "neighborhood", "--size", "8", "--dim", "16", *FAST],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "neighborhood" in done.stdout and "ref ok" in done.stdout


def test_viz_attention_map_from_a_checkpoint(tmp_path, capsys):
    from attnzoo import models

    torch.manual_seed(0)
    model = models.create("tiny", mixers=("neighborhood", "mhsa", "mhsa", "mhsa"), num_classes=10, in_chans=1)
    models.save(model, tmp_path / "run")
    out = tmp_path / "ck.png"
    argv = ["viz", "attention-map", "mhsa", "--checkpoint", str(tmp_path / "run"), "--query", "3,3", "--out", str(out)]
    assert main(argv) == 0
    assert png_shape(out) == (484, 924)
    argv[2] = "window"
    assert main(argv) == 2 and "not one of them" in one_error_line(capsys.readouterr().err)


def test_train_options_come_from_the_models_and_data_modules(monkeypatch, tmp_path, capsys):
    """The CLI hard-codes no sizes, stage counts or data sets: a size added to ``attnzoo.models.SIZES`` (3 stages)
    and a data set added to ``attnzoo.training.data.DATASETS`` show up as choices and set the stage count."""
    from attnzoo.cli import build_parser, train_cmd
    from attnzoo.models import SIZES, BackboneSize
    from attnzoo.training import data

    micro = BackboneSize(dims=(8, 16, 32), depths=(1, 1, 1), stem_stride=2, mlp_ratio=2.0, img_size=28)
    monkeypatch.setitem(SIZES, "micro", micro)
    monkeypatch.setitem(data.DATASETS, "planted", "a data set only this test knows")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "micro (3 stages)" in help_text and "planted: a data set only this test knows" in help_text
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            "--size",
            "micro",
            "--dataset",
            "planted",
            "--mixers",
            "mhsa,window,mhsa",
            "--mixer-kwargs",
            "{}",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    config = train_cmd._config(args)
    assert config.mixers == ["mhsa", "window", "mhsa"] and config.mixer_kwargs == [{}, {}, {}]
    assert config.dataset == "planted"
    assert train_cmd._config(parser.parse_args(["train", "--size", "micro", "--mixer", "mhsa"])).mixers == ["mhsa"] * 3
    code = main(["train", "--size", "micro", "--mixers", "mhsa,window,mhsa,mhsa", "--out", str(tmp_path / "s")])
    assert code == 2 and "must name 1 or 3 mechanisms" in one_error_line(capsys.readouterr().err)


def test_bench_tool_fills_the_relative_latency():
    """The yardstick ratio is computed by ``attnzoo.tools.bench``, not by the CLI that prints it."""
    from attnzoo.tools.bench import BenchConfig, bench_mechanism

    cfg = BenchConfig(size=8, dim=16, batch=1, threads=1, min_run_time=0.01)
    row = bench_mechanism("neighborhood", cfg, yardstick_s=2.5e-3)
    assert row.ok and row.relative_latency == pytest.approx(row.latency_s / 2.5e-3)
    assert math.isnan(bench_mechanism("neighborhood", cfg).relative_latency)
