"""Every code example runs: README.md's and docs/**/*.md's Python blocks, and the ``>>>``
examples in fnn's docstrings (``doctest``, NORMALIZE_WHITESPACE | ELLIPSIS).

Pages and modules are found when the tests are collected, so a new page or module is picked
up by itself. Examples run in a temporary directory that links the repository's top-level
entries (so ``examples/...`` and ``benchmarks/...`` read as from the root, and files an
example writes land in the temporary directory).
"""
from pathlib import Path

import pytest

import doc_examples as dx
from doc_examples import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


@pytest.fixture
def in_tmp_root(tmp_path, monkeypatch):
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, in_tmp_root):
    dx.run_page(page)


@pytest.mark.parametrize("name", dx.fnn_modules())
def test_docstring_examples_run(name, in_tmp_root):
    try:
        module = dx.import_module(name)
    except dx.MissingOptional as e:
        pytest.skip(f"{name} needs the optional package {e}")
    tests = dx.module_doctests(module)
    found = dx.example_lines(tests)
    missing = sorted(dx.prompt_lines(Path(module.__file__)) - found)
    assert not missing, (f"{name}: these >>> lines are in no docstring doctest finds (an "
                         f"object doctest cannot locate?), so they never run: "
                         + ", ".join(f"{f}:{n}" for f, n in missing))
    dx.run_module(module)


# The collector itself: each check can fail.

PAGE = """\
Text.

```python
a = 1
```

```bash
exit 1
```

```python no-run
raise SystemExit("peer library")
```

```{.python .no-run}
import torch
```

- a list item:

    ```python
    b = a + 1
    ```

~~~py
>>> b * 10
20
~~~
"""


def test_code_blocks_finds_fences_languages_and_no_run():
    blocks = dx.code_blocks(PAGE)
    assert [b.line for b in blocks] == [4, 8, 12, 16, 22, 26]
    assert [dx.runs(b) for b in blocks] == [True, False, False, False, True, True]
    assert blocks[4].code == "b = a + 1\n"


def test_run_page_shares_one_namespace(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert dx.run_page(page) == 3


def test_run_page_names_file_and_line_of_a_failure(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\ny = undefined_name + x\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md:5: .*block starting at line 4.*"
                                             r"undefined_name"):
        dx.run_page(page)


def test_run_page_reports_a_wrong_session_output(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```pycon\n>>> 1 + 1\n3\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md.*line 2.*\n.*\n.*1 \+ 1"):
        dx.run_page(page)


def test_docstring_examples_report_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "mod_with_bad_example.py").write_text(
        'def f():\n    """Doc.\n\n    >>> f() + 1\n    3\n    """\n    return 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    module = dx.import_module("mod_with_bad_example")
    tests = dx.module_doctests(module)
    assert dx.example_lines(tests) == dx.prompt_lines(Path(module.__file__))
    with pytest.raises(AssertionError, match=r"mod_with_bad_example\.py\", line 4"):
        dx.run_module(module)


def test_missing_optional_package_is_named():
    with pytest.raises(dx.MissingOptional, match="no_such_package_fnn_test"):
        dx.import_module("no_such_package_fnn_test.sub")
