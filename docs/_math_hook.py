"""An MkDocs hook: the site's formulas become MathML at build time, so they render offline.

pymdownx.arithmatex (``generic: true``) wraps each formula of a page, API pages included (the
docstrings' ``:math:`x``` roles arrive as ``$x$`` through ``_griffe_rst.py``), in
``<span class="arithmatex">\\(...\\)</span>`` (inline) or ``<div class="arithmatex">\\[...\\]</div>``
(display, also from ``$$...$$``). This hook replaces each of those with the MathML that
latex2mathml makes of it; browsers draw MathML natively, so no script and no network is needed.
A formula latex2mathml cannot read fails the build, naming the page and the formula.
"""
from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<body>.*?)\s*</(?P=tag)>', re.DOTALL
)
_DELIMITERS = {"(": ")", "[": "]"}


def _to_mathml(match: re.Match, where: str) -> str:
    body, tag = match.group("body"), match.group("tag")
    if len(body) < 4 or body[0] != "\\" or body[1] not in _DELIMITERS or \
            body[-2:] != "\\" + _DELIMITERS[body[1]]:
        raise ValueError(f"{where}: an arithmatex element not in \\( \\) or \\[ \\]: {body!r}")
    tex = html.unescape(body[2:-2]).strip()
    display = "block" if tag == "div" or body[1] == "[" else "inline"
    try:
        mathml = convert(tex, display=display)
    except Exception as err:  # latex2mathml raises several types; name the formula either way
        raise ValueError(f"{where}: latex2mathml cannot convert {tex!r}: {err}") from err
    mathml = mathml.replace("<math ", f'<math alttext="{html.escape(tex)}" ', 1)
    if display == "block":
        return f'<div class="arithmatex">{mathml}</div>'
    return f'<span class="arithmatex">{mathml}</span>'


def math_to_mathml(text: str, where: str = "page") -> str:
    """``text`` (a page's HTML) with every arithmatex formula turned into MathML."""
    return _ARITHMATEX.sub(lambda m: _to_mathml(m, where), text)


def on_page_content(html_text: str, page, config, files) -> str:  # MkDocs hook
    return math_to_mathml(html_text, page.file.src_uri)
