"""The documentation site: built from the registry, every page and image loads in a real browser, links resolve."""

from __future__ import annotations

import pytest

import attnzoo
from attnzoo.cli import main
from attnzoo.tools.docs import build_docs, mechanism_doc

from browser import broken_internal_links, check_pages, screenshot

NAMES = ["neighborhood", "squeeze_excite", "retention"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    build_docs(out, NAMES)
    return out


def test_mechanism_doc_comes_from_the_registry_and_the_class():
    doc = mechanism_doc("window")
    info = attnzoo.mechanism_info("window")
    assert (doc.paper, doc.year, doc.reference, doc.receptive_field) == (info.paper, info.year, info.reference, "local")
    assert ("window_size", "7") in doc.arguments and ("shift_size", "0") in doc.arguments
    assert doc.definition[0].startswith("Swin (shifted) window attention")


def test_site_has_a_page_per_mechanism_with_its_facts(site):
    catalogue = (site / "catalogue.html").read_text()
    for name in NAMES:
        page = (site / "mechanisms" / f"{name}.html").read_text()
        info = attnzoo.mechanism_info(name)
        assert f'href="mechanisms/{name}.html"' in catalogue
        assert info.paper in page and f"<code>{name}</code>" in page
        assert f'src="{name}.png"' in page  # the receptive-field picture
        assert "params" in page and "FAILED" not in page
    assert "How a call flows" in (site / "index.html").read_text()


def test_every_page_and_image_loads_in_a_browser_and_links_resolve(site, tmp_path):
    pages = [site / "index.html", site / "catalogue.html", *sorted((site / "mechanisms").glob("*.html"))]
    results = check_pages(site, pages)
    assert len(results) == len(pages)
    for result in results:
        assert "error" not in result, result
        assert result["title"], result["page"]
        assert not result["broken"], f"{result['page']}: images that did not load: {result['broken']}"
    assert sum(r["images"] for r in results) == len(NAMES)
    assert not broken_internal_links(results)
    shot = screenshot(site / "catalogue.html", tmp_path / "catalogue.png")
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_broken_link_is_reported(tmp_path):
    (tmp_path / "a.html").write_text('<title>a</title><a href="missing.html">x</a><a href="a.html#nowhere">y</a>')
    results = check_pages(tmp_path, [tmp_path / "a.html"])
    assert len(broken_internal_links(results)) == 2


def test_docs_cli_refuses_unknown_names_and_empty_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["docs", "neighbourhood", "--out", "d"]) == 2
    assert "did you mean 'neighborhood'" in capsys.readouterr().err
    assert main(["docs", "mhsa", "--out", ""]) == 2
    assert "--out must name a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
