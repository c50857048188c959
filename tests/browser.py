"""Open generated HTML in a real headless browser (Debian's ``chromium``): every page loads, every image decodes.

``check_pages(root, pages)`` loads each page in an iframe of a small harness page and reports, per page, its title,
the images that failed to load and the links it contains; ``screenshot(page, png)`` takes a picture of one page.
Tests skip when chromium is not installed (CI installs it).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

HARNESS = """<!doctype html><html><body><pre id="result">pending</pre><script>
const pages = %s;
function check(page) {
  return new Promise(resolve => {
    const frame = document.createElement("iframe");
    frame.onload = () => {
      const doc = frame.contentDocument;
      if (!doc) { resolve({page, error: "no access to the page"}); return; }
      const images = [...doc.images];
      resolve({page, url: doc.URL, title: doc.title, images: images.length,
               broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
               links: [...doc.querySelectorAll("a[href]")].map(a => a.href),
               ids: [...doc.querySelectorAll("[id]")].map(e => e.id)});
    };
    frame.src = page;
    document.body.appendChild(frame);
  });
}
(async () => {
  const results = [];
  for (const page of pages) results.push(await check(page));
  document.getElementById("result").textContent = JSON.stringify(results);
})();
</script></body></html>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _run(args: list[str], timeout: float = 120) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def check_pages(root: Path, pages: list[Path]) -> list[dict]:
    """Load ``pages`` (under ``root``) in the browser; one dict per page (see the module docstring)."""
    harness = root / "_browser_check.html"
    harness.write_text(HARNESS % json.dumps([p.relative_to(root).as_posix() for p in pages]))
    try:
        dom = _run(["--virtual-time-budget=20000", "--dump-dom", harness.as_uri()])
    finally:
        harness.unlink()
    match = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert match and match.group(1) != "pending", f"the browser did not finish checking the pages: {dom[:500]}"
    return json.loads(html.unescape(match.group(1)))


def broken_internal_links(results: list[dict]) -> list[str]:
    """``file://`` links whose target file, or whose ``#fragment`` on a checked page, does not exist."""
    ids = {Path(unquote(urlparse(r["url"]).path)): set(r["ids"]) for r in results if "url" in r}
    broken = []
    for result in results:
        for link in result["links"]:
            url = urlparse(link)
            if url.scheme != "file":
                continue
            target = Path(unquote(url.path))
            if not target.is_file():
                broken.append(f"{result['page']} → {link}")
            elif url.fragment and target in ids and url.fragment not in ids[target]:
                broken.append(f"{result['page']} → {link} (no #{url.fragment})")
    return broken


def dump_dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran (``fragment``: the part of the URL after ``#``)."""
    return _run(["--virtual-time-budget=5000", "--dump-dom", page.as_uri() + (f"#{fragment}" if fragment else "")])


def screenshot(page: Path, png: Path, size: str = "1400,2000") -> Path:
    _run([f"--screenshot={png}", f"--window-size={size}", page.as_uri()])
    return png
