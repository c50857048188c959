"""Write benchmark results: CSV and JSON of every figure, PNG plots, and an index.html that shows them together.

matplotlib is imported only when a plot is drawn, so the table helpers cost the CLI nothing at start-up.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.saving import atomic_write
from .bench import BenchConfig, BenchRow

__all__ = [
    "TABLE_COLUMNS",
    "table_cells",
    "write_csv",
    "write_json",
    "plot_scaling",
    "plot_cost_vs_receptive_field",
    "write_index_html",
    "write_report",
    "environment",
]

TABLE_COLUMNS = (
    "mechanism",
    "family",
    "params",
    "GFLOPs",
    "peak MB",
    "latency ms",
    "× SDPA",
    "img/s",
    "RF tokens",
    "check",
)
SCALING_COLUMNS = ("latency exp", "memory exp")


def _num(value: float, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def table_cells(row: BenchRow, with_scaling: bool) -> list[str]:
    """The row as strings in ``TABLE_COLUMNS`` order (plus ``SCALING_COLUMNS``); a failed row says why in check."""
    cells = [
        row.name,
        row.family,
        f"{row.params:,}" if row.ok or row.params else "—",
        _num(row.flops / 1e9, ".3g"),
        _num(row.peak_bytes / 2**20, ".1f"),
        _num(row.latency_s * 1e3, ".2f"),
        _num(row.relative_latency, ".3g"),
        _num(row.throughput, ".1f"),
        _num(row.receptive_field_tokens, ".0f"),
        row.check if row.ok else f"FAILED: {row.error}",
    ]
    if row.ok and row.note:
        cells[-1] += f" ({row.note})"
    if with_scaling:
        cells += [_num(row.latency_exponent, ".2f"), _num(row.memory_exponent, ".2f")]
    return cells


def environment(cfg: BenchConfig) -> dict[str, Any]:
    """Machine and software the figures were measured on."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads,
        "device": cfg.device,
        "dtype": cfg.dtype,
    }


def write_csv(rows: Sequence[BenchRow], cfg: BenchConfig, path: Path) -> None:
    """One line per mechanism; scaling figures as ``latency_ms@S`` / ``peak_mb@S`` columns per size ``S``."""
    fields = [
        "name",
        "family",
        "complexity",
        "layout",
        "ok",
        "params",
        "flops",
        "peak_mb",
        "latency_ms",
        "relative_latency",
        "throughput_img_s",
        "check",
        "receptive_field_tokens",
        "receptive_field_fraction",
        "latency_exponent",
        "memory_exponent",
    ]
    for s in cfg.sizes:
        fields += [f"latency_ms@{s}", f"peak_mb@{s}"]
    fields += ["note", "error", "config"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            line = {
                "name": r.name,
                "family": r.family,
                "complexity": r.complexity,
                "layout": r.layout,
                "ok": r.ok,
                "params": r.params,
                "flops": r.flops,
                "peak_mb": r.peak_bytes / 2**20,
                "latency_ms": r.latency_s * 1e3,
                "relative_latency": r.relative_latency,
                "throughput_img_s": r.throughput,
                "check": r.check,
                "receptive_field_tokens": r.receptive_field_tokens,
                "receptive_field_fraction": r.receptive_field_fraction,
                "latency_exponent": r.latency_exponent,
                "memory_exponent": r.memory_exponent,
                "note": r.note,
                "error": r.error,
                "config": json.dumps(r.as_dict()["config"]),
            }
            for p in r.scaling:
                line[f"latency_ms@{p.size}"] = p.latency_s * 1e3
                line[f"peak_mb@{p.size}"] = p.peak_bytes / 2**20
            writer.writerow(line)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(rows: Sequence[BenchRow], cfg: BenchConfig, path: Path, yardstick_s: float = math.nan) -> None:
    """Workload, environment, the yardstick latency and every row (NaN written as null)."""
    payload = {
        "workload": cfg.__dict__,
        "environment": environment(cfg),
        "yardstick_dense_sdpa_latency_s": yardstick_s,
        "results": [r.as_dict() for r in rows],
    }
    path.write_text(json.dumps(_json_safe(payload), indent=2))


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(rows: Sequence[BenchRow], what: str, path: Path) -> None:
    """Log-log ``latency`` or ``memory`` against token count: one small panel per family, one line per mechanism
    with its fitted exponent in the panel's legend, the same axes in every panel so families compare at a glance."""
    key, exp_key, scale, label = {
        "latency": ("latency_s", "latency_exponent", 1e3, "median latency (ms)"),
        "memory": ("peak_bytes", "memory_exponent", 1 / 2**20, "peak memory (MiB)"),
    }[what]
    curves: dict[str, list[tuple[str, float, list[tuple[int, float]]]]] = {}
    for r in rows:
        points = [(p.tokens, getattr(p, key) * scale) for p in r.scaling]
        points = [(t, v) for t, v in points if math.isfinite(v) and v > 0]
        if points:
            curves.setdefault(r.family, []).append((r.name, getattr(r, exp_key), points))
    plt = _pyplot()
    cols = min(3, max(1, len(curves)))
    panels = max(1, len(curves))
    fig, axes = plt.subplots(
        math.ceil(panels / cols),
        cols,
        figsize=(4.2 * cols, 3.4 * math.ceil(panels / cols)),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    cmap = plt.get_cmap("tab10")
    for ax, family in zip(axes.flat, sorted(curves)):
        for i, (name, exponent, points) in enumerate(curves[family]):
            ax.plot(
                *zip(*points),
                ("-", "--")[(i // 10) % 2],
                marker="o",
                ms=3,
                color=cmap(i % 10),
                label=f"{name} ({exponent:.2f})" if math.isfinite(exponent) else name,
            )
        ax.set_title(family, fontsize=10)
        ax.legend(fontsize=6.5, loc="upper left")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if not ax.has_data():
            ax.axis("off")
    if not curves:
        axes[0][0].axis("on")
        axes[0][0].text(
            0.5, 0.5, "no scaling data (run with --sizes)", ha="center", va="center", transform=axes[0][0].transAxes
        )
    fig.supxlabel("tokens N (size²)")
    fig.supylabel(label)
    fig.suptitle(
        f"{label.split(' (')[0].capitalize()} vs tokens by family (log-log; fitted exponent in brackets: "
        "≈ 1 linear/local, ≈ 2 global)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost_vs_receptive_field(rows: Sequence[BenchRow], cfg: BenchConfig, path: Path) -> None:
    """Latency (and FLOPs as marker size) against the centre query's receptive field, one point per mechanism."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 6), layout="constrained")
    good = [r for r in rows if r.ok and math.isfinite(r.receptive_field_fraction) and math.isfinite(r.latency_s)]
    top_flops = max((r.flops for r in good if math.isfinite(r.flops)), default=math.nan)
    families = sorted({r.family for r in good})
    cmap = plt.get_cmap("tab10")
    for f_i, family in enumerate(families):  # 10 colours, then the next marker shape
        members = [r for r in good if r.family == family]
        sizes = [20 + 200 * r.flops / top_flops if math.isfinite(r.flops) and top_flops > 0 else 20 for r in members]
        ax.scatter(
            [100 * r.receptive_field_fraction for r in members],
            [r.latency_s * 1e3 for r in members],
            s=sizes,
            color=cmap(f_i % 10),
            marker="os^D"[(f_i // 10) % 4],
            alpha=0.75,
            label=family,
            edgecolors="k",
            linewidths=0.5,
        )
        for r in members:
            ax.annotate(
                r.name,
                (100 * r.receptive_field_fraction, r.latency_s * 1e3),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"receptive field of the centre query (% of the {cfg.size}×{cfg.size} tokens)")
    ax.set_ylabel("median latency (ms)" + (" forward+backward" if cfg.backward else " forward"))
    ax.set_title("Cost vs receptive field (marker area ∝ FLOPs)")
    ax.grid(True, which="both", alpha=0.3)
    if good:
        legend = fig.legend(fontsize=8, title="family", loc="outside right upper")
        for handle in legend.legend_handles:
            handle.set_sizes([40])
    fig.savefig(path, dpi=120)
    plt.close(fig)


SORT_SCRIPT = """
const table = document.getElementById("results");
const headers = [...table.tHead.rows[0].cells];
function sortBy(column, order) {
  const rows = [...table.tBodies[0].rows];
  const key = row => row.cells[column].dataset.sort;
  const numeric = rows.every(row => key(row) === "" || !isNaN(parseFloat(key(row))));
  const compare = numeric
    ? (a, b) => (key(a) === "" ? Infinity : parseFloat(key(a))) - (key(b) === "" ? Infinity : parseFloat(key(b)))
    : (a, b) => key(a).localeCompare(key(b));
  rows.sort((a, b) => (order === "asc" ? 1 : -1) * compare(a, b));
  rows.forEach(row => table.tBodies[0].appendChild(row));
  headers.forEach(h => delete h.dataset.order);
  headers[column].dataset.order = order;
}
headers.forEach((h, i) => h.addEventListener("click", () => sortBy(i, h.dataset.order === "asc" ? "desc" : "asc")));
const wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ""));
const start = headers.findIndex(h => h.textContent === wanted);
if (start >= 0) sortBy(start, "asc");
"""


def _sort_key(cell: str) -> str:
    """What a table cell sorts by: its number (thousands separators removed) or its text; '' for no value."""
    text = cell.replace(",", "").strip()
    if text in ("—", ""):
        return ""
    try:
        return repr(float(text))
    except ValueError:
        return html.escape(cell, quote=True)


def write_index_html(
    rows: Sequence[BenchRow], cfg: BenchConfig, images: Sequence[str], path: Path, yardstick_s: float = math.nan
) -> None:
    """A self-contained page: workload, environment, the table, and the plots (linked by relative path)."""
    with_scaling = bool(cfg.sizes)
    header = list(TABLE_COLUMNS) + (list(SCALING_COLUMNS) if with_scaling else [])
    body = []
    for r in rows:
        cells = "".join(f'<td data-sort="{_sort_key(c)}">{html.escape(c)}</td>' for c in table_cells(r, with_scaling))
        body.append(f'<tr class="{"ok" if r.ok else "failed"}">{cells}</tr>')
    env = environment(cfg)
    workload = (
        f"{cfg.size}×{cfg.size} tokens, dim {cfg.dim}, batch {cfg.batch}, {cfg.dtype} on {cfg.device}, "
        f"{cfg.threads} thread(s), {'forward+backward' if cfg.backward else 'forward'}"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attnzoo bench</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, td:nth-child(2), td:nth-child(10) {{ text-align: left; }}
tr.failed {{ background: #fdd; }}
th {{ cursor: pointer; background: #f0f0f0; }}
th[data-order="asc"]::after {{ content: " ▲"; }}
th[data-order="desc"]::after {{ content: " ▼"; }}
img {{ max-width: 100%; margin: 1em 0; }}
</style></head><body>
<h1>attnzoo bench</h1>
<p>Workload: {html.escape(workload)}. Scaling sizes: {html.escape(", ".join(map(str, cfg.sizes)) or "none")}.</p>
<p>Environment: {html.escape(", ".join(f"{k} {v}" for k, v in env.items()))}.</p>
<p>Peak memory: bytes allocated during one call above what was live before it (torch.profiler memory events on CPU,
max_memory_allocated on CUDA). Latency: median of torch.utils.benchmark blocked_autorange; × SDPA = latency divided
by that of dense SDPA over all tokens at the same workload, measured in the same run ({_num(yardstick_s * 1e3, ".2f")} ms).
FLOPs: torch.utils.flop_counter (matmul, conv, attention; the engine's fused op and FFTs by registered formulas;
elementwise ops and softmax not counted).
Check: "ref ok" = equal to the same module run under use_backend("reference"); "finite" = finite output of a
mechanism that makes no engine call.
Raw figures: <a href="bench.csv">bench.csv</a>, <a href="bench.json">bench.json</a>.
Click a column header to sort by it (again to reverse); <code>index.html#sort=latency ms</code> opens the page sorted.</p>
<table id="results"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
{chr(10).join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in images)}
<script>{SORT_SCRIPT}</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def write_report(rows: Sequence[BenchRow], cfg: BenchConfig, out: Path, yardstick_s: float = math.nan) -> list[Path]:
    """Everything into directory ``out``: bench.csv, bench.json, the PNG plots and index.html; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "bench.csv", out / "bench.json"
    # Every file is written new and renamed into place: a symlink in ``out`` is replaced, never followed.
    atomic_write(csv_path, lambda p: write_csv(rows, cfg, p))
    atomic_write(json_path, lambda p: write_json(rows, cfg, p, yardstick_s))
    images = ["latency_vs_tokens.png", "memory_vs_tokens.png", "cost_vs_receptive_field.png"]
    atomic_write(out / images[0], lambda p: plot_scaling(rows, "latency", p))
    atomic_write(out / images[1], lambda p: plot_scaling(rows, "memory", p))
    atomic_write(out / images[2], lambda p: plot_cost_vs_receptive_field(rows, cfg, p))
    atomic_write(out / "index.html", lambda p: write_index_html(rows, cfg, images, p, yardstick_s))
    return [csv_path, json_path, *(out / i for i in images), out / "index.html"]
