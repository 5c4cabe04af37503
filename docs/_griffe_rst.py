"""A griffe extension that lets fnn's reST-flavoured docstrings render as Markdown.

fnn's docstrings are written to read well in ``help()``: ``:func:`name``` roles, ``Example::``
literal blocks, ``>>>`` doctest lines and lists right under a bold heading. mkdocstrings renders
docstrings as Markdown, where those come out as literal colons, nested block quotes and run-on
paragraphs. This extension rewrites each docstring's text before it is parsed (the source files
are untouched):

- ``:math:`x``` -> ``$x$`` (arithmatex; `_math_hook.py` turns it into MathML);
- ``:func:`x``` (any role: func, class, mod, meth, attr, data, obj, ``~`` prefix) -> ``x``
  as inline code;
- a paragraph ending in ``::`` -> ``:`` (reST's literal-block marker; the indented block that
  follows is already a Markdown code block);
- a run of ``>>>``/``...`` lines (and their output up to a blank line) -> a fenced ``pycon``
  block;
- a list item right after a paragraph line -> a blank line first (Markdown needs one), and
  a line opening with a bold heading (``**Params:**``) starts a new paragraph.

A public module-level name bound without a docstring (``silu = swish``, ``macro_f1 =
Metric(...)``) gets a one-line one saying what it is bound to, so the API reference lists it.
"""
from __future__ import annotations

import re

import griffe

_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")
_HEAD = re.compile(r"^\*\*[A-Z][\w ()/-]*:\*\*")
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")


def _roles(text: str) -> str:
    text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


def _doctest_fences(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return out


def _literal_markers(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.rstrip().endswith("::") and not line.lstrip().startswith(">>>"):
            head = line.rstrip()[:-2]
            if not head.strip():             # a lone "::" line
                continue
            line = head + ":"
        out.append(line)
    return out


def _list_spacing(lines: list[str]) -> list[str]:
    out: list[str] = []
    fence = False
    for line in lines:
        if line.lstrip().startswith("```"):
            fence = not fence
        if (not fence and _ITEM.match(line) and out and out[-1].strip()
                and not _ITEM.match(out[-1]) and not out[-1].startswith((" ", "\t"))):
            out.append("")
        elif not fence and _HEAD.match(line) and out and out[-1].strip():
            out.append("")                  # "**Params:** ..." starts its own paragraph
        out.append(line)
    return out


def to_markdown(text: str) -> str:
    """fnn docstring text -> the Markdown mkdocstrings renders."""
    lines = _roles(text).split("\n")
    lines = _list_spacing(_literal_markers(_doctest_fences(lines)))
    return "\n".join(lines)


def _binding(attr) -> str:
    """A one-line description of a module attribute from its value expression."""
    value = str(attr.value or "")
    if re.fullmatch(r"[A-Za-z_][\w.]*", value):
        return f"Another name for `{value}`: the same object."
    call = re.match(r"([A-Za-z_][\w.]*)\(", value)
    if call:
        return f"A `{call.group(1)}` instance (see the module's description above)."
    return f"The constant `{value}`." if len(value) < 80 else "A module-level constant."


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`to_markdown` as soon as griffe creates the object."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
        elif (obj.is_attribute and obj.parent is not None and obj.parent.is_module
              and not obj.name.startswith("_")):
            obj.docstring = griffe.Docstring(_binding(obj), parent=obj)
