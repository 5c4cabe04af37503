"""Run the documentation's code: Markdown ```python blocks and the ``>>>`` examples of fnn.

Used by ``tests/test_doc_examples.py``. A Markdown page's Python blocks run in order in one
namespace, so a later block uses what an earlier one defined, as a reader would. A block is
skipped when its fence's info string says ``no-run`` (```` ```python no-run ```` or
```` ```{.python .no-run} ````); ``bash``, ``text``, ``console`` and other languages are not
Python. A block whose first line starts with ``>>>`` is a session and runs with ``doctest``.
Failures name the file and line of the example.
"""
from __future__ import annotations

import doctest
import inspect
import importlib
import io
import re
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PYTHON = {"python", "py", "python3", "pycon"}
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")


class Block(NamedTuple):
    line: int          # 1-based line of the first code line in the file
    info: str          # the fence's info string, e.g. "python no-run"
    code: str


def code_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text, indented ones (lists, admonitions) too."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = len(m["indent"]), m["fence"], i + 1
        j = start
        while j < len(lines) and not (lines[j].strip().startswith(fence)
                                      and not lines[j].strip().strip(fence[0])):
            j += 1
        body = [l[indent:] if l[:indent].strip() == "" else l.lstrip() for l in lines[start:j]]
        blocks.append(Block(start + 1, m["info"], "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def words(info: str) -> list[str]:
    """The words of an info string: ``"python no-run"`` and ``"{.python .no-run}"`` alike."""
    return [w.lstrip(".") for w in re.split(r"[\s{}]+", info) if w]


def runs(block: Block) -> bool:
    """Whether a block is Python to run: a Python language and no ``no-run`` word."""
    w = words(block.info)
    return bool(w) and w[0].lower() in PYTHON and "no-run" not in w


def run_page(path: Path) -> int:
    """Run a Markdown page's Python blocks in order in one namespace; returns how many ran.

    Raises ``AssertionError`` naming ``path`` and the line that failed.
    """
    __tracebackhide__ = True                     # pytest: show the example, not this
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    namespace = {"__name__": f"doc_example_{path.stem}"}
    count = 0
    for block in code_blocks(path.read_text(encoding="utf-8")):
        if not runs(block):
            continue
        count += 1
        if block.code.lstrip().startswith(">>>"):
            _run_session(block, rel, namespace)
        else:
            _run_code(block, rel, namespace)
    return count


def _run_code(block: Block, rel, namespace: dict) -> None:
    __tracebackhide__ = True                     # pytest: show the example, not this
    # Pad with blank lines so that tracebacks give the line numbers of the page itself.
    code = compile("\n" * (block.line - 1) + block.code, str(rel), "exec")
    try:
        exec(code, namespace)
    except Exception as e:                       # report where in the page, then what
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(rel)]
        line = frames[-1].lineno if frames else block.line
        src = block.code.splitlines()[line - block.line] if frames else ""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])
        raise AssertionError(f"{rel}:{line}: the code block starting at line {block.line} "
                             f"failed at `{src.strip()}`:\n{type(e).__name__}: {e}\n\n{tb}"
                             ) from None


def _run_session(block: Block, rel, namespace: dict) -> None:
    __tracebackhide__ = True                     # pytest: show the example, not this
    test = doctest.DocTestParser().get_doctest(block.code, namespace, str(rel), str(rel),
                                               block.line - 1)
    _run_doctests([test], str(rel))


def _run_doctests(tests, where: str) -> int:
    """Run doctests; raise ``AssertionError`` with each failure's ``file:line``."""
    __tracebackhide__ = True                     # pytest: show the example, not this
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=out.write, clear_globs=False)
    result = runner.summarize(verbose=False)
    if result.failed:
        raise AssertionError(f"{where}: {result.failed} of {result.attempted} examples "
                             f"failed\n{out.getvalue()}")
    return result.attempted


def fnn_modules() -> list[str]:
    """Every module of the ``fnn`` package, by file (nothing is imported)."""
    pkg = ROOT / "fnn"
    names = []
    for f in sorted(pkg.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":              # importing it would run the command line
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


class MissingOptional(Exception):
    """Importing a module needs a package that is not installed (its name is the message)."""


def import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "fnn":
            raise MissingOptional(e.name) from e
        raise


class _Finder(doctest.DocTestFinder):
    """doctest's finder, also for functions under a ``functools.wraps`` decorator (layer
    constructors under ``@fnn.core.constructor``): whose they are is the wrapped function's
    module."""

    def _from_module(self, module, obj):
        return super()._from_module(module, inspect.unwrap(obj) if inspect.isfunction(obj) else obj)

    def _find_lineno(self, obj, source_lines):
        return super()._find_lineno(inspect.unwrap(obj) if inspect.isfunction(obj) else obj,
                                    source_lines)


def module_doctests(module) -> list[doctest.DocTest]:
    """The doctests of ``module``'s own docstrings (not of names it imports)."""
    tests = _Finder(exclude_empty=True).find(module, module.__name__)
    return [t for t in tests if t.examples]


def example_lines(tests) -> set[tuple[str, int]]:
    """``(file, line)`` of every example the doctests hold (1-based lines)."""
    return {(t.filename, t.lineno + ex.lineno + 1) for t in tests for ex in t.examples
            if t.lineno is not None}


def prompt_lines(path: Path) -> set[tuple[str, int]]:
    """``(file, line)`` of every ``>>>`` line in a source file."""
    text = Path(path).read_text(encoding="utf-8").splitlines()
    return {(str(path), i + 1) for i, l in enumerate(text) if l.lstrip().startswith(">>> ")
            or l.strip() == ">>>"}


def run_module(module) -> int:
    """Run ``module``'s doctests; returns how many examples ran."""
    __tracebackhide__ = True                     # pytest: show the example, not this
    tests = module_doctests(module)
    return _run_doctests(tests, module.__name__) if tests else 0


if __name__ == "__main__":          # python tests/doc_examples.py PAGE.md ...: run pages
    for p in sys.argv[1:]:
        print(p, run_page(Path(p).resolve()), "blocks")
