"""The docs site reads offline: its formulas become MathML at build time (docs/_math_hook.py)
and docs/_check_offline.py (run by .ci/run on the built site) catches raw TeX, anything loaded
from another host and missing images. These tests hold both to small pages written here; they
build no site."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load("_check_offline")

CLEAN = """<html><head><link rel="stylesheet" href="style.css"><script src="app.js"></script>
<link rel="next" href="https://example.org/next"></head><body>
<p>Plain <span class="arithmatex"><math><mi>x</mi></math></span> and a link to
<a href="https://github.com/">another host</a>.</p><img src="fig/a.png">
<pre><code>re.match(r"\\(\\d+\\)", s)  # $$ in code is code</code></pre></body></html>"""


def _site(tmp_path, page):
    (tmp_path / "fig").mkdir()
    for name in ("style.css", "app.js", "fig/a.png"):
        (tmp_path / name).write_text("")
    (tmp_path / "page.html").write_text(page)
    return check.check_site(tmp_path)


def test_a_clean_page_passes(tmp_path):
    assert _site(tmp_path, CLEAN) == {}


@pytest.mark.parametrize("change, found", [
    (("<p>Plain", "<p>\\(x^2\\) Plain"), "raw math '\\\\('"),
    (("<p>Plain", "<p>\\[x^2\\] Plain"), "raw math '\\\\['"),
    (("<p>Plain", "<p>$$x^2$$ Plain"), "raw math '$$'"),
    (("<math><mi>x</mi></math>", "\\(x\\)"), "no MathML"),
    (('src="app.js"', 'src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"'),
     "from another host"),
    (('href="style.css"', 'href="//fonts.googleapis.com/css?family=Roboto"'), "from another host"),
    (('src="fig/a.png"', 'src="fig/missing.png"'), "missing from the site"),
    (('src="fig/a.png"', 'src="http://example.org/a.png"'), "from another host"),
    (('href="style.css"', 'href="gone.css"'), "missing from the site"),
])
def test_each_problem_fails_the_page(tmp_path, change, found):
    old, new = change
    assert old in CLEAN
    problems = _site(tmp_path, CLEAN.replace(old, new))
    assert list(problems) == ["page.html"]
    assert any(found in p for p in problems["page.html"]), problems


def test_the_hook_turns_arithmatex_into_mathml():
    pytest.importorskip("latex2mathml")
    hook = _load("_math_hook")
    page = ('<p>Step <span class="arithmatex">\\(\\theta \\leftarrow \\theta - \\eta\\,g '
            '&gt; 0\\)</span>.</p>\n<div class="arithmatex">\\[\\sqrt{\\hat v} + \\epsilon\\]</div>')
    out = hook.math_to_mathml(page, "test.md")
    assert "\\(" not in out and "\\[" not in out
    inline, block = re.findall(r"<math [^>]*>", out)
    assert 'display="inline"' in inline and 'display="block"' in block
    assert "<mi>&#x003B8;</mi>" in out or "<mi>θ</mi>" in out          # \theta is an identifier
    assert "<msqrt>" in out and "&gt;" in out                          # > stays escaped
    with pytest.raises(ValueError, match="test.md"):
        hook.math_to_mathml(r'<span class="arithmatex">\(\left( x\)</span>', "test.md")


def test_the_site_config_loads_nothing_from_another_host():
    text = (ROOT / "mkdocs.yml").read_text()
    assert "docs/_math_hook.py" in text and "font: false" in text
    assert not re.search(r"^\s*-\s*(https?:)?//", text, re.MULTILINE), "a script or stylesheet URL"


def test_no_table_in_the_docs_shows_a_backslash_before_a_bar():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    rows = [(p.name, line) for p in pages for line in p.read_text().splitlines()
            if line.lstrip().startswith("|") and "\\|" in line]
    assert rows == []
