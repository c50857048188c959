"""The bench report (``index.html``) in a real headless browser: it loads, its plots decode, its table sorts."""

from __future__ import annotations

import re

import pytest

from attnzoo.tools.bench import BenchConfig, bench_mechanism
from attnzoo.tools.report import write_report

from browser import broken_internal_links, check_pages, dump_dom, screenshot

NAMES = ["neighborhood", "mhsa", "squeeze_excite", "linear"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(size=8, dim=16, batch=1, threads=1, sizes=(8, 16), min_run_time=0.01, sweep_min_run_time=0.01)
    rows = [bench_mechanism(name, cfg) for name in NAMES]
    assert all(r.ok for r in rows), [r.error for r in rows]
    write_report(rows, cfg, out)
    return out, rows


def test_report_page_and_plots_load_and_links_resolve(report, tmp_path):
    out, _ = report
    (result,) = check_pages(out, [out / "index.html"])
    assert result["images"] == 3 and not result["broken"], result
    assert not broken_internal_links([result])
    assert screenshot(out / "index.html", tmp_path / "report.png").stat().st_size > 10_000


def _first_column(dom: str) -> list[str]:
    body = dom.split("<tbody>", 1)[1]
    return re.findall(r"<tr[^>]*><td[^>]*>([^<]*)</td>", body)


@pytest.mark.parametrize("column,field", [("params", "params"), ("mechanism", "name")])
def test_report_table_sorts_by_a_column(report, column, field):
    out, rows = report
    dom = dump_dom(out / "index.html", fragment=f"sort={column}")
    expected = [r.name for r in sorted(rows, key=lambda r: getattr(r, field))]
    assert _first_column(dom) == expected
