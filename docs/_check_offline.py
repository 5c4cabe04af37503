"""Check that a built site reads offline: ``python docs/_check_offline.py SITE_DIR``.

For every ``.html`` page of the built site (``mkdocs build --site-dir SITE_DIR``) this fails,
listing each page and what it found, when

- the page's text still holds raw TeX math — ``\\(``, ``\\[`` or ``$$`` outside code, or an
  ``arithmatex`` element without MathML in it (``docs/_math_hook.py`` converts every formula to
  MathML at build time; raw TeX means a formula a reader sees as source, since no MathJax is
  loaded);
- it loads a script, a stylesheet, a font or an image from another host (``http:``, ``https:``
  or ``//``), which an offline reader does not get;
- an ``<img>``, a ``<script src>`` or a ``<link rel="stylesheet">`` points to a file missing from
  the site.

Links (``<a href>``) to other hosts are fine: they are for the reader to follow. Exit status 0
when every page passes, 1 otherwise.
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

RAW_MATH = ("\\(", "\\[", "$$")
SKIP_TEXT = {"pre", "code", "script", "style", "textarea"}   # code may quote TeX on purpose
LOADED = {"link": "href", "script": "src", "img": "src", "source": "src", "iframe": "src"}
LINK_RELS_LOADED = {"stylesheet", "preload", "modulepreload", "preconnect", "icon"}


def _remote(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme in ("http", "https") or (not parts.scheme and parts.netloc))


class _Page(HTMLParser):
    def __init__(self, path: Path, site: Path):
        super().__init__(convert_charrefs=True)
        self.path, self.site, self.problems = path, site, []
        self._skip = 0              # depth inside pre/code/script/style
        self._math: list[list] = []  # open arithmatex elements: [tag, saw_math]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in SKIP_TEXT:
            self._skip += 1
        if "arithmatex" in (a.get("class") or "").split():
            self._math.append([tag, False])
        elif self._math and tag == "math":
            for open_ in self._math:
                open_[1] = True
        self._check_resource(tag, a)

    def handle_startendtag(self, tag, attrs):
        self._check_resource(tag, dict(attrs))

    def handle_endtag(self, tag):
        if tag in SKIP_TEXT and self._skip:
            self._skip -= 1
        if self._math and self._math[-1][0] == tag:
            _, saw_math = self._math.pop()
            if not saw_math:
                self.problems.append("an arithmatex element with no MathML in it")

    def handle_data(self, data):
        if self._skip:
            return
        for mark in RAW_MATH:
            if mark in data:
                at = data.index(mark)
                self.problems.append(f"raw math {mark!r} in the text: {data[max(0, at - 30):at + 50]!r}")

    def _check_resource(self, tag, a):
        attr = LOADED.get(tag)
        url = a.get(attr) if attr else None
        if not url:
            return
        if tag == "link":
            rels = set((a.get("rel") or "").lower().split())
            if not rels & LINK_RELS_LOADED:
                return                  # rel="next", "canonical", ...: navigation, not loaded
        if _remote(url):
            self.problems.append(f"<{tag}> loads {url!r} from another host")
            return
        if url.startswith(("data:", "#")) or urlsplit(url).scheme:
            return
        path = unquote(urlsplit(url).path)
        base = self.site if path.startswith("/") else self.path.parent   # 404.html: root-relative
        target = (base / path.lstrip("/")).resolve()
        if not target.is_file() and not (target / "index.html").is_file():
            self.problems.append(f"<{tag}> points to {url!r}, missing from the site")


def check_site(site: Path) -> dict[str, list[str]]:
    """``{page: [problem, ...]}`` for every page of ``site`` with a problem."""
    found = {}
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return {str(site): ["no .html pages: is this a built site?"]}
    for path in pages:
        parser = _Page(path, site)
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        if parser.problems:
            found[str(path.relative_to(site))] = parser.problems
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python docs/_check_offline.py SITE_DIR", file=sys.stderr)
        return 2
    site = Path(argv[1])
    found = check_site(site)
    for page, problems in found.items():
        for problem in problems:
            print(f"{page}: {problem}")
    n = len(list(site.rglob("*.html")))
    if found:
        print(f"{len(found)} of {n} pages do not read offline", file=sys.stderr)
        return 1
    print(f"all {n} pages read offline: no raw math, nothing from another host, every image there")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
