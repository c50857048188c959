"""The documentation site: the architecture page (``docs/*.md``) and a mechanism catalogue generated from the registry.

``build_docs(out)`` writes static HTML: ``index.html`` (the architecture), ``catalogue.html`` (every mechanism by
family) and one page per mechanism under ``mechanisms/`` with its paper, the definition from its docstring, its
arguments and defaults, complexity, receptive-field class, parity reference, its receptive-field picture and its bench
row at a small workload. Everything comes from the registry, so a new mechanism appears with no change here.
"""

from __future__ import annotations

import html
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..mechanisms import list_mechanisms, mechanism_info
from .bench import BenchConfig, BenchRow, bench_mechanism
from .receptive import mechanism_view

__all__ = ["MechanismDoc", "mechanism_doc", "build_docs", "DOCS_SOURCE"]

DOCS_SOURCE = Path(__file__).resolve().parents[2] / "docs"

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #222; }
nav { margin-bottom: 1.5em; } nav a { margin-right: 1.2em; }
pre, code { background: #f4f4f4; border-radius: 3px; } pre { padding: .8em; overflow-x: auto; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff8e0; padding: .6em; border-left: 3px solid #e0b000; }
img { max-width: 100%; }
"""


@dataclass
class MechanismDoc:
    """What the catalogue says about one mechanism (all from the registry and the class)."""

    name: str
    family: str
    paper: str
    year: int
    layout: str
    complexity: str
    receptive_field: str
    slot: str
    reference: str
    note: str
    paper_identity: bool
    definition: list[str]
    arguments: list[tuple[str, str]]
    bench: BenchRow | None = None
    picture: str = ""
    problems: list[str] = field(default_factory=list)


def mechanism_doc(name: str) -> MechanismDoc:
    """The registry entry of ``name`` with its docstring paragraphs and constructor arguments (``name``, default)."""
    info = mechanism_info(name)
    doc = inspect.cleandoc(info.cls.__doc__ or "")
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    arguments = [
        (p.name, "required" if p.default is inspect.Parameter.empty else repr(p.default))
        for p in inspect.signature(info.cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return MechanismDoc(
        name,
        info.family,
        info.paper,
        info.year,
        info.layout,
        info.complexity,
        info.receptive_field,
        info.slot,
        info.reference,
        info.note,
        info.paper_identity,
        paragraphs,
        arguments,
    )


def _page(title: str, body: str, root: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<link rel="stylesheet" href="{root}style.css"></head><body>\n'
        f'<nav><a href="{root}index.html">Architecture</a><a href="{root}catalogue.html">Mechanism catalogue</a></nav>\n'
        f"{body}\n</body></html>\n"
    )


def _markdown(text: str) -> str:
    try:
        import markdown
    except ModuleNotFoundError as exc:  # a core dependency; say so plainly if it was removed
        raise RuntimeError("the docs need the 'markdown' package: pip install markdown") from exc
    return markdown.markdown(text, extensions=["fenced_code", "tables"])


def _prose(text: str) -> str:
    """A docstring paragraph as HTML: escaped, with ````code```` spans as ``<code>``."""
    parts = html.escape(text).split("``")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _num(value: float, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _bench_cells(row: BenchRow | None) -> list[str]:
    if row is None:
        return ["—"] * 4
    if not row.ok:
        return ["—", "—", "—", html.escape(row.error or "failed")]
    return [
        f"{row.params:,}",
        _num(row.flops / 1e9, ".3g"),
        _num(row.latency_s * 1e3, ".2f"),
        _num(row.peak_bytes / 2**20, ".1f"),
    ]


BENCH_HEADERS = ("params", "GFLOPs", "latency ms", "peak MB")


def _mechanism_page(doc: MechanismDoc, cfg: BenchConfig) -> str:
    e = html.escape
    rows = [
        ("family", doc.family),
        ("paper", f"{doc.paper} ({doc.year})"),
        ("layout", doc.layout),
        ("complexity", doc.complexity),
        ("receptive field (default)", doc.receptive_field),
        ("slot", doc.slot),
        ("parity reference", doc.reference or "—"),
        ("paper's module adds an identity", "yes: paper output = x + this output" if doc.paper_identity else "no"),
    ]
    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    definition = "".join(f"<p>{_prose(p)}</p>" for p in doc.definition) or "<p>—</p>"
    args = "".join(f"<tr><td><code>{e(n)}</code></td><td><code>{e(d)}</code></td></tr>" for n, d in doc.arguments)
    note = f'<p class="note">{_prose(doc.note)}</p>' if doc.note else ""
    bench = "".join(f"<th>{h}</th>" for h in BENCH_HEADERS)
    cells = "".join(f'<td class="num">{c}</td>' for c in _bench_cells(doc.bench))
    picture = (
        f'<img src="{e(doc.picture)}" alt="receptive field of {e(doc.name)}">' if doc.picture else "<p>not drawn</p>"
    )
    return _page(
        doc.name,
        (
            f"<h1><code>{e(doc.name)}</code></h1>{definition}{note}<table>{facts}</table>"
            f"<h2>Arguments</h2><table><tr><th>argument</th><th>default</th></tr>{args}</table>"
            f"<h2>Receptive field</h2><p>Gradient receptive field of the centre query (and, for attention, its exact "
            f"attention weights), default configuration, "
            f"{cfg.size}×{cfg.size} tokens, dim {cfg.dim}.</p>{picture}"
            f"<h2>Bench row</h2><p>{cfg.size}×{cfg.size} tokens, dim {cfg.dim}, batch {cfg.batch}, {cfg.threads} thread(s), "
            f"forward, {cfg.dtype}, {cfg.device}.</p><table><tr>{bench}</tr><tr>{cells}</tr></table>"
        ),
        "../",
    )


def _catalogue_page(docs: Sequence[MechanismDoc], cfg: BenchConfig) -> str:
    e = html.escape
    parts = [
        f"<h1>Mechanism catalogue</h1><p>{len(docs)} mechanisms. Bench columns: {cfg.size}×{cfg.size} tokens, "
        f"dim {cfg.dim}, batch {cfg.batch}, forward.</p>"
    ]
    head = "".join(f"<th>{h}</th>" for h in ("mechanism", "paper", "year", "complexity", "sees", *BENCH_HEADERS))
    for family in sorted({d.family for d in docs}):
        parts.append(f'<h2 id="{e(family)}">{e(family)}</h2><table><tr>{head}</tr>')
        for d in (d for d in docs if d.family == family):
            cells = "".join(f'<td class="num">{c}</td>' for c in _bench_cells(d.bench))
            parts.append(
                f'<tr><td><a href="mechanisms/{e(d.name)}.html"><code>{e(d.name)}</code></a></td><td>{e(d.paper)}</td>'
                f"<td>{d.year}</td><td>{e(d.complexity)}</td><td>{e(d.receptive_field)}</td>{cells}</tr>"
            )
        parts.append("</table>")
    return _page("attnzoo mechanism catalogue", "".join(parts), "")


def _draw(name: str, cfg: BenchConfig, path: Path) -> str:
    """The receptive-field picture of ``name`` at ``path``; returns a problem description or ''."""
    from .figures import receptive_field_figure

    view = mechanism_view(name, cfg.size, cfg.dim, [(cfg.size // 2, cfg.size // 2)], strict=False)
    if view.error:
        return view.error
    receptive_field_figure([view], cfg.size, path, dpi=70)
    return ""


def build_docs(
    out: Path,
    names: Sequence[str] | None = None,
    *,
    pictures: bool = True,
    bench: bool = True,
    config: BenchConfig | None = None,
    progress: Callable[[str], Any] | None = None,
) -> list[Path]:
    """Write the site into ``out`` (created if needed) and return the files written.

    ``names`` limits the catalogue (default: every registered mechanism); ``pictures``/``bench`` draw the receptive
    fields and measure the bench rows (``config``: default 28×28 tokens, dim 32, batch 1, one thread, short timing).
    """
    names = list_mechanisms() if names is None else list(names)
    for name in names:
        mechanism_info(name)  # unknown names raise (with suggestions) before anything is written
    cfg = config or BenchConfig(size=28, dim=32, batch=1, threads=1, min_run_time=0.05)
    out = Path(out)
    (out / "mechanisms").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        written.append(path)

    docs = []
    for name in names:
        if progress:
            progress(name)
        doc = mechanism_doc(name)
        if bench:
            doc.bench = bench_mechanism(name, cfg)
        if pictures:
            picture = out / "mechanisms" / f"{name}.png"
            problem = _draw(name, cfg, picture)
            if problem:
                doc.problems.append(problem)
            else:
                doc.picture = picture.name
                written.append(picture)
        write(out / "mechanisms" / f"{name}.html", _mechanism_page(doc, cfg))
        docs.append(doc)
    write(out / "style.css", STYLE)
    for source in sorted(DOCS_SOURCE.glob("*.md")):  # architecture.md is the index; links to X.md go to X.html
        body = re.sub(
            r'href="([\w-]+)\.md(#[^"]*)?"', r'href="\1.html\2"', _markdown(source.read_text(encoding="utf-8"))
        )
        page = "index.html" if source.stem == "architecture" else f"{source.stem}.html"
        write(out / page, _page(f"attnzoo {source.stem}", body, ""))
    write(out / "catalogue.html", _catalogue_page(docs, cfg))
    return written
